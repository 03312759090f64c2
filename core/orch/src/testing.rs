//! Test helpers: N ranks emulated by threads in one process, so that the
//! data-parallel code can be tested without `mpirun`.

use std::sync::{Arc, Barrier, Mutex};

use llm_esr_comm::{CommError, CommErrorKind, Communicator};

/// N ranks emulated by threads: each collective meets at a barrier and
/// reads the others' buffers from shared slots.
pub struct ThreadComm {
    rank: usize,
    size: usize,
    slots: Arc<Mutex<Vec<Vec<f64>>>>,
    barrier: Arc<Barrier>,
}

impl ThreadComm {
    fn exchange(&self, mine: Vec<f64>) -> Vec<Vec<f64>> {
        self.slots.lock().unwrap()[self.rank] = mine;
        self.barrier.wait();
        let all = self.slots.lock().unwrap().clone();
        self.barrier.wait();
        all
    }

    fn sum(&self, buf: &[f64]) -> Vec<f64> {
        let all = self.exchange(buf.to_vec());
        (0..buf.len())
            .map(|i| all.iter().map(|b| b[i]).sum())
            .collect()
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.rank
    }
    fn backend(&self) -> &'static str {
        "threads"
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let wide: Vec<f64> = buf.iter().map(|&x| x as f64).collect();
        for (b, s) in buf.iter_mut().zip(self.sum(&wide)) {
            *b = s as f32;
        }
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CommError> {
        buf.copy_from_slice(&self.sum(buf));
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        let all = self.exchange(buf.iter().map(|&x| x as f64).collect());
        for (b, &r) in buf.iter_mut().zip(&all[root]) {
            *b = r as f32;
        }
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CommError> {
        let all = self.exchange(buf.iter().map(|&x| x as f64).collect());
        *buf = all[root].iter().map(|&x| x as u8).collect();
        Ok(())
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.barrier.wait();
        Ok(())
    }
    fn split(&self, _: u32, _: u32) -> Result<Box<dyn Communicator>, CommError> {
        Err(CommError::new(CommErrorKind::Unavailable, "not emulated"))
    }
}

/// Runs `f(comm)` on `size` emulated ranks and returns their results.
pub fn on_ranks<T: Send + 'static>(
    size: usize,
    f: impl Fn(&dyn Communicator) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let slots = Arc::new(Mutex::new(vec![Vec::new(); size]));
    let barrier = Arc::new(Barrier::new(size));
    let f = Arc::new(f);
    let handles: Vec<_> = (0..size)
        .map(|rank| {
            let comm = ThreadComm {
                rank,
                size,
                slots: slots.clone(),
                barrier: barrier.clone(),
            };
            let f = f.clone();
            std::thread::spawn(move || f(&comm))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}
