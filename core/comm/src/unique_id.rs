//! Sharing a collective library's opaque unique id from rank 0 to every rank
//! over a host communicator: how the NCCL backend bootstraps (rank 0 calls
//! `ncclGetUniqueId`, the others receive its 128 bytes over MPI). Kept apart
//! from the `nccl` feature so that the exchange, and its failure path, are
//! tested over `mpirun -np 2` on machines without a GPU (`comm-selftest`).

use crate::{CommError, CommErrorKind, Communicator};

/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// Rank 0 runs `make` and every rank returns its id. When `make` fails, rank
/// 0 returns that error and the other ranks a `RemoteFailure` (an empty
/// message tells them), so that no rank goes on to wait for the others in
/// the collective library's set-up.
pub fn share_unique_id(
    comm: &dyn Communicator,
    make: impl FnOnce() -> Result<[u8; UNIQUE_ID_BYTES], CommError>,
) -> Result<[u8; UNIQUE_ID_BYTES], CommError> {
    let mut bytes = Vec::new();
    let mut failure = None;
    if comm.rank() == 0 {
        match make() {
            Ok(id) => bytes = id.to_vec(),
            Err(e) => failure = Some(e),
        }
    }
    comm.broadcast_bytes(&mut bytes, 0)?;
    if let Some(e) = failure {
        return Err(e);
    }
    <[u8; UNIQUE_ID_BYTES]>::try_from(bytes.as_slice()).map_err(|_| {
        CommError::new(
            CommErrorKind::RemoteFailure,
            "rank 0 could not create the collective library's unique id; see its error message",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SingleProcess;

    #[test]
    fn one_rank_gets_its_own_id_and_its_own_error() {
        let id = share_unique_id(&SingleProcess, || Ok([7; UNIQUE_ID_BYTES])).unwrap();
        assert_eq!(id, [7; UNIQUE_ID_BYTES]);
        let err = share_unique_id(&SingleProcess, || {
            Err(CommError::new(CommErrorKind::Device, "no GPU"))
        })
        .unwrap_err();
        assert_eq!(err.kind(), CommErrorKind::Device);
    }
}
