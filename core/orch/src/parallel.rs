//! Data parallelism: which part of a global batch (or of the evaluated users)
//! this rank takes. Every rank takes items r, r + N, r + 2N, ... of the same
//! ordered list, so the union over ranks is the list and the shards differ in
//! size by at most one.

use llm_esr_comm::Communicator;

/// This rank's shard of `items`.
pub fn shard<T: Clone>(items: &[T], comm: &dyn Communicator) -> Vec<T> {
    items
        .iter()
        .skip(comm.rank())
        .step_by(comm.size())
        .cloned()
        .collect()
}
