//! Retrieval-augmented self-distillation (LLM-ESR): the teacher of each user
//! is the mean of its similar users' representations, computed by the same
//! model in training mode without gradient.

use anyhow::{bail, Result};
use llm_esr_runtime::candle::Tensor;
use llm_esr_runtime::{ForwardCtx, Retrieval, Rng};

use crate::data::{Dataset, Padded, UserIdx};
use crate::model::{last_position, Recommender, Tables};

/// Teacher sequences encoded per forward pass.
const TEACHER_CHUNK: usize = 256;

/// The teachers of one step: which similar users each user learns from, and
/// the distinct teachers' training inputs (`train[:-1]`), known before the
/// step's item tables are made (the tables need the items they read).
pub struct Teachers<'a> {
    /// Per user of the step, its teachers (user indices).
    lists: Vec<Vec<u32>>,
    /// The distinct teachers, ascending.
    distinct: Vec<u32>,
    ds: &'a Dataset,
}

impl<'a> Teachers<'a> {
    pub fn new(retrieval: &dyn Retrieval, ds: &'a Dataset, users: &[UserIdx]) -> Result<Self> {
        let ids: Vec<u32> = users.iter().map(|u| u.index32()).collect();
        let lists = retrieval.teachers(&ids)?;
        check_teachers(&lists, users.len(), ds.num_users)?;
        let mut distinct: Vec<u32> = lists.concat();
        distinct.sort_unstable();
        distinct.dedup();
        Ok(Teachers {
            lists,
            distinct,
            ds,
        })
    }

    /// Teacher `t`'s input sequence.
    fn input(&self, t: u32) -> &'a [u32] {
        let s = self.ds.train_seq(UserIdx::new(t));
        &s[..s.len().saturating_sub(1)]
    }

    /// Every item the teachers' inputs hold.
    pub fn items(&self) -> impl Iterator<Item = u32> + '_ {
        self.distinct
            .iter()
            .flat_map(|&t| self.input(t).iter().copied())
    }

    /// The distillation teacher of each user: the mean of its similar users'
    /// representations (last position), computed by the same model in
    /// training mode, without gradient. Each distinct teacher is encoded once.
    pub fn encode(&self, model: &Recommender, tables: &Tables, step: u64) -> Result<Tensor> {
        let distinct = &self.distinct;
        // Encode in chunks of similar length, each padded to its own longest
        // sequence (the masked encoder gives the same result as one big batch,
        // at a fraction of the cost of padding a thousand teachers to the longest).
        let mut order: Vec<usize> = (0..distinct.len()).collect();
        order.sort_by_key(|&j| (self.input(distinct[j]).len(), j));
        let dev = &model.device;
        let mut chunks = Vec::new();
        for chunk in order.chunks(TEACHER_CHUNK) {
            let inputs: Vec<&[u32]> = chunk.iter().map(|&j| self.input(distinct[j])).collect();
            // Every chunk restarts the step's stream and keys dropout by teacher,
            // so a teacher's masks do not depend on the chunking (or the rank).
            let rows: Vec<u64> = chunk.iter().map(|&j| distinct[j] as u64).collect();
            let mut rng = Rng::derive(model.settings.seed ^ 0x0074_6561_6368_6572, step);
            let mut ctx = ForwardCtx::new(true, &mut rng).with_rows(&rows);
            let padded = Padded::new(
                &inputs,
                model.settings.max_len,
                model.settings.pad_to_max_len,
            );
            let ids = Tensor::from_vec(padded.ids, (padded.b, padded.l), dev)?;
            let mask = Tensor::from_vec(padded.mask, (padded.b, padded.l), dev)?;
            chunks.push(last_position(&model.encode(tables, &ids, &mask, &mut ctx)?)?.detach());
        }
        // Rows of `reps` follow `order`; `row_of[j]` is distinct[j]'s row.
        let reps = Tensor::cat(&chunks, 0)?;
        let mut row_of = vec![0usize; distinct.len()];
        for (row, &j) in order.iter().enumerate() {
            row_of[j] = row;
        }
        let mut avg = vec![0f32; self.lists.len() * distinct.len()];
        for (i, ts) in self.lists.iter().enumerate() {
            for t in ts {
                let j = distinct
                    .binary_search(t)
                    .expect("teacher is in the distinct set");
                avg[i * distinct.len() + row_of[j]] += 1.0 / ts.len() as f32;
            }
        }
        let avg = Tensor::from_vec(avg, (self.lists.len(), distinct.len()), dev)?;
        Ok(avg.matmul(&reps)?)
    }
}

/// A retrieval plugin's answer must name existing users, one list per user
/// asked: anything else would index out of range.
fn check_teachers(teachers: &[Vec<u32>], asked: usize, num_users: usize) -> Result<()> {
    if teachers.len() != asked {
        bail!(
            "the retrieval plugin returned {} teacher lists for {asked} users",
            teachers.len()
        );
    }
    if let Some(bad) = teachers
        .iter()
        .flatten()
        .find(|&&t| t as usize >= num_users)
    {
        bail!(
            "the retrieval plugin returned teacher {bad}, but users are indexed 0..{num_users}: \
             check its neighbour table against the dataset"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teachers_must_be_existing_users_one_list_per_user() {
        assert!(check_teachers(&[vec![0, 2], vec![]], 2, 3).is_ok());
        let err = check_teachers(&[vec![0, 3]], 1, 3).unwrap_err().to_string();
        assert!(err.contains("teacher 3") && err.contains("0..3"), "{err}");
        assert!(check_teachers(&[vec![0]], 2, 3).is_err());
    }
}
