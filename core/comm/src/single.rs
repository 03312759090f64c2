//! The one-process backend: size 1, every collective is the identity.

use crate::error::{check_root, CommError};
use crate::Communicator;

/// A communicator of one rank. Reductions and broadcasts leave the buffer as it
/// is; the barrier returns at once; `split` gives another single communicator.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl SingleProcess {
    /// The communicator of a process that runs alone.
    pub fn new() -> Self {
        SingleProcess
    }
}

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<(), CommError> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<(), CommError> {
        check_root(root, 1)
    }
    fn broadcast_bytes(&self, _buf: &mut Vec<u8>, root: usize) -> Result<(), CommError> {
        check_root(root, 1)
    }
    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
    fn split(&self, _color: u32, _key: u32) -> Result<Box<dyn Communicator>, CommError> {
        Ok(Box::new(SingleProcess))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CommErrorKind;

    #[test]
    fn collectives_are_identity() {
        let c = SingleProcess::new();
        assert_eq!((c.rank(), c.size(), c.local_rank()), (0, 1, 0));
        assert_eq!(c.backend(), "single");
        assert!(c.is_root());
        let mut a = vec![1.5f32, -2.0, 3.25];
        c.all_reduce_sum(&mut a).unwrap();
        c.broadcast(&mut a, 0).unwrap();
        assert_eq!(a, [1.5, -2.0, 3.25]);
        let mut d = vec![0.1f64, 1e300];
        c.all_reduce_sum_f64(&mut d).unwrap();
        assert_eq!(d, [0.1, 1e300]);
        let mut b = b"hello".to_vec();
        c.broadcast_bytes(&mut b, 0).unwrap();
        assert_eq!(b, b"hello");
        c.barrier().unwrap();
        let mut empty: Vec<f32> = Vec::new();
        c.all_reduce_sum(&mut empty).unwrap();
    }

    #[test]
    fn bad_root_is_an_error() {
        let c = SingleProcess::new();
        let e = c.broadcast(&mut [0.0], 1).unwrap_err();
        assert_eq!(e.kind(), CommErrorKind::InvalidArgument);
        assert!(e.to_string().contains("root 1"), "{e}");
        assert!(c.broadcast_bytes(&mut Vec::new(), 3).is_err());
    }

    #[test]
    fn split_is_single() {
        let c = SingleProcess::new();
        let s = c.split(7, 3).unwrap();
        assert_eq!((s.rank(), s.size(), s.backend()), (0, 1, "single"));
    }
}
