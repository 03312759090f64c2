//! The retrieval half of LLM-ESR's retrieval-augmented self-distillation as an
//! llm-esr-orch retrieval plugin: each user's teachers are the first `n`
//! (official `--sim_user_num`, 10) of the users most similar by cosine of their
//! language-model embeddings `U_llm`, precomputed by the data pipeline (the
//! official `sim_user_100.pkl`: 100 per user, best first, the user itself
//! dropped). The loss is `nn.MSELoss()` of the official `user_sim_func = "kd"`:
//! the mean of squared differences over all elements of (b, h).
//!
//! The teacher is detached inside [`Retrieval::distill_loss`], so gradients
//! reach only the student even if the host passes a teacher built with a graph
//! (the official code computes teachers with gradients on and detaches them).
//! What this crate does not do: encode or average the teachers; the host runs
//! the model on the teachers' sequences (see the report / host docs) and passes
//! the mean over the `n` teachers.

use llm_esr_runtime::candle::{DType, Result, Tensor};
use llm_esr_runtime::serde::Deserialize;
use llm_esr_runtime::{export_plugin, Retrieval, RetrievalSpec};

/// `model.retrieval_config` for semantic kNN.
#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "llm_esr_runtime::serde", deny_unknown_fields, default)]
pub struct Config {
    /// Teachers per user (official `--sim_user_num`, default 10); at most the
    /// number of neighbours stored.
    pub n: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config { n: 10 }
    }
}

pub struct SemanticKnn {
    /// The first `n` neighbours of every user.
    neighbours: Vec<Vec<u32>>,
}

impl SemanticKnn {
    pub fn load(spec: &RetrievalSpec, cfg: Config) -> Result<Self> {
        let t = &spec.neighbours;
        if t.dtype() != DType::U32 {
            llm_esr_runtime::candle::bail!(
                "semantic-knn: the neighbour table must be u32, got {:?}",
                t.dtype()
            );
        }
        let (num_users, k_stored) = t.dims2().map_err(|_| {
            llm_esr_runtime::candle::Error::Msg(format!(
                "semantic-knn: the neighbour table must be (num_users, k), got shape {:?}",
                t.dims()
            ))
        })?;
        if cfg.n == 0 {
            llm_esr_runtime::candle::bail!(
                "config key `model.retrieval_config.n`: must be at least 1"
            );
        }
        if cfg.n > k_stored {
            llm_esr_runtime::candle::bail!(
                "config key `model.retrieval_config.n`: {} teachers asked for but only {k_stored} \
                 neighbours per user are stored; lower n or recompute the neighbours with k >= {}",
                cfg.n,
                cfg.n
            );
        }
        let rows = t.narrow(1, 0, cfg.n)?.to_vec2::<u32>()?;
        for (u, row) in rows.iter().enumerate() {
            if let Some(&bad) = row.iter().find(|&&v| v as usize >= num_users) {
                llm_esr_runtime::candle::bail!(
                    "semantic-knn: neighbour {bad} of user {u} is out of range (there are \
                     {num_users} users); recompute the neighbours"
                );
            }
        }
        Ok(SemanticKnn { neighbours: rows })
    }
}

impl Retrieval for SemanticKnn {
    fn teachers(&self, users: &[u32]) -> Result<Vec<Vec<u32>>> {
        users
            .iter()
            .map(|&u| match self.neighbours.get(u as usize) {
                Some(row) => Ok(row.clone()),
                None => llm_esr_runtime::candle::bail!(
                    "semantic-knn: user {u} is out of range (the neighbour table has {} users)",
                    self.neighbours.len()
                ),
            })
            .collect()
    }

    /// `mean((student - teacher)^2)` over all elements, the teacher detached.
    fn distill_loss(&self, student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
        if student.dims() != teacher.dims() {
            llm_esr_runtime::candle::bail!(
                "semantic-knn: student {:?} and teacher {:?} differ in shape",
                student.dims(),
                teacher.dims()
            );
        }
        (student - teacher.detach())?.sqr()?.mean_all()
    }
}

export_plugin!(retrieval, "semantic-knn", load = SemanticKnn::load);

#[cfg(test)]
mod tests {
    use super::*;
    use llm_esr_runtime::candle::{Device, Var};
    use llm_esr_runtime::serde_json::{json, Value};
    use llm_esr_runtime::{RetrievalFactory, RetrievalPlugin};

    const FACTORY: RetrievalFactory<Config, SemanticKnn> = RetrievalFactory::new(SemanticKnn::load);

    fn table() -> Tensor {
        // 4 users, 3 neighbours stored each, best first.
        Tensor::new(
            &[[1u32, 2, 3], [0, 3, 2], [3, 0, 1], [2, 1, 0]],
            &Device::Cpu,
        )
        .unwrap()
    }

    fn build(config: Value) -> Result<Box<dyn Retrieval>> {
        FACTORY.build(&RetrievalSpec {
            neighbours: table(),
            config,
        })
    }

    fn err(config: Value, neighbours: Tensor) -> String {
        FACTORY
            .build(&RetrievalSpec { neighbours, config })
            .err()
            .unwrap()
            .to_string()
    }

    #[test]
    fn config_defaults_and_errors() {
        let cfg: Config =
            llm_esr_runtime::parse_plugin_config("model.retrieval_config", &json!(null)).unwrap();
        assert_eq!(cfg.n, 10);
        // The default n = 10 exceeds the 3 stored neighbours.
        let e = err(json!(null), table());
        assert!(
            e.contains("model.retrieval_config.n") && e.contains('3'),
            "{e}"
        );
        let e = err(json!({"n": 0}), table());
        assert!(e.contains("model.retrieval_config.n"), "{e}");
        let e = err(json!({"k": 2}), table());
        assert!(
            e.contains("model.retrieval_config") && e.contains('k'),
            "{e}"
        );
        let e = err(json!({"n": 2}), table().to_dtype(DType::F32).unwrap());
        assert!(e.contains("u32"), "{e}");
        let bad = Tensor::new(&[[1u32, 7], [0, 1]], &Device::Cpu).unwrap();
        let e = err(json!({"n": 2}), bad);
        assert!(e.contains("7") && e.contains("user 0"), "{e}");
        // Out-of-range ids beyond the first n are not used and not checked.
        let ok = Tensor::new(&[[1u32, 7], [0, 9]], &Device::Cpu).unwrap();
        assert!(FACTORY
            .build(&RetrievalSpec {
                neighbours: ok,
                config: json!({"n": 1})
            })
            .is_ok());
    }

    #[test]
    fn teachers_are_the_first_n_neighbours() {
        let r = build(json!({"n": 2})).unwrap();
        assert_eq!(
            r.teachers(&[2, 0, 2]).unwrap(),
            vec![vec![3, 0], vec![1, 2], vec![3, 0]]
        );
        assert_eq!(r.teachers(&[]).unwrap(), Vec::<Vec<u32>>::new());
        let e = r.teachers(&[1, 4]).unwrap_err().to_string();
        assert!(e.contains("user 4") && e.contains("4 users"), "{e}");
        let r = build(json!({"n": 3})).unwrap();
        assert_eq!(r.teachers(&[3]).unwrap(), vec![vec![2, 1, 0]]);
    }

    #[test]
    fn mse_matches_a_hand_computation_and_stops_the_teacher_gradient() {
        let r = build(json!({"n": 1})).unwrap();
        let s = [[0.5f32, -1.0, 2.0], [0.0, 3.0, -0.25]];
        let t = [[1.5f32, -1.0, 0.0], [0.5, 1.0, 0.75]];
        let student = Var::new(&s, &Device::Cpu).unwrap();
        let teacher = Var::new(&t, &Device::Cpu).unwrap();
        let loss = r
            .distill_loss(student.as_tensor(), teacher.as_tensor())
            .unwrap();
        let mut want = 0f32;
        for i in 0..2 {
            for j in 0..3 {
                want += (s[i][j] - t[i][j]).powi(2);
            }
        }
        want /= 6.0;
        assert!((loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
        let grads = loss.backward().unwrap();
        let g = grads
            .get(student.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for i in 0..2 {
            for j in 0..3 {
                let want = 2.0 * (s[i][j] - t[i][j]) / 6.0;
                assert!((g[i][j] - want).abs() < 1e-6);
            }
        }
        assert!(grads.get(teacher.as_tensor()).is_none());
        let e = r
            .distill_loss(
                student.as_tensor(),
                &teacher.as_tensor().narrow(1, 0, 2).unwrap(),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("shape"), "{e}");
    }
}
