//! The leave-one-out split convention, shared by the long-tail groups, the
//! user prompts and the trainer: the last item of a sequence is the test
//! target, the one before it the validation target, the rest the training
//! part. This module depends on nothing else of the crate.

/// The training part of a sequence under the leave-one-out split, exactly as the
/// official code: `seq[:-2]` when the sequence has at least 3 items, otherwise
/// the whole sequence (such a user has no validation or test target).
pub fn train_part(seq: &[u32]) -> &[u32] {
    if seq.len() >= 3 {
        &seq[..seq.len() - 2]
    } else {
        seq
    }
}
