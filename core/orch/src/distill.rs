//! Retrieval-augmented self-distillation (LLM-ESR): the teacher of each user
//! is the mean of its similar users' representations, computed by the same
//! model in training mode without gradient.

use anyhow::Result;
use llm_esr_runtime::candle::Tensor;
use llm_esr_runtime::{ForwardCtx, Retrieval, Rng};

use crate::data::{Dataset, Padded};
use crate::model::{last_position, Recommender, Tables};

/// Teacher sequences encoded per forward pass.
const TEACHER_CHUNK: usize = 256;

/// The distillation teacher of each user: the mean of its similar users'
/// representations (their training input `train[:-1]`, last position),
/// computed by the same model in training mode, without gradient. Each
/// distinct teacher is encoded once per step.
pub fn teacher(
    model: &Recommender,
    retrieval: &dyn Retrieval,
    ds: &Dataset,
    tables: &Tables,
    users: &[u32],
    step: u64,
) -> Result<Tensor> {
    let teachers = retrieval.teachers(users)?;
    let mut distinct: Vec<u32> = teachers.concat();
    distinct.sort_unstable();
    distinct.dedup();
    let input = |t: u32| {
        let s = ds.train_seq(t as usize);
        &s[..s.len().saturating_sub(1)]
    };
    // Encode in chunks of similar length, each padded to its own longest
    // sequence (the masked encoder gives the same result as one big batch,
    // at a fraction of the cost of padding a thousand teachers to the longest).
    let mut order: Vec<usize> = (0..distinct.len()).collect();
    order.sort_by_key(|&j| (input(distinct[j]).len(), j));
    let dev = &model.device;
    let mut chunks = Vec::new();
    for chunk in order.chunks(TEACHER_CHUNK) {
        let inputs: Vec<&[u32]> = chunk.iter().map(|&j| input(distinct[j])).collect();
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
    let distinct_rows: Vec<usize> = row_of;
    let mut avg = vec![0f32; users.len() * distinct.len()];
    for (i, ts) in teachers.iter().enumerate() {
        for t in ts {
            let j = distinct
                .binary_search(t)
                .expect("teacher is in the distinct set");
            avg[i * distinct.len() + distinct_rows[j]] += 1.0 / ts.len() as f32;
        }
    }
    let avg = Tensor::from_vec(avg, (users.len(), distinct.len()), dev)?;
    Ok(avg.matmul(&reps)?)
}
