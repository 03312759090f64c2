//! Benchmark / manual run: prepare a dataset in the `inter.txt` layout and build
//! its semantic artifacts, printing the timings.
//!
//! ```text
//! cargo run --release -p llm-esr-prep --example embed -- \
//!     ../shared/datasets/beauty5 /tmp/beauty5 ../shared/models/all-MiniLM-L6-v2 [--force]
//! ```
//! Writes the prepared dataset to `OUT/dataset` and the artifacts to
//! `OUT/artifacts`; a second run reports every stage as up to date. Leave
//! `CANDLE_NUM_THREADS` unset here: for this forward-only work the threaded
//! elementwise ops (erf, exp) win (measured 107 vs 80 items/s on 2 cores).

use std::path::PathBuf;
use std::time::Instant;

use llm_esr_prep::artifacts::{embed, Artifacts, EmbedConfig};
use llm_esr_prep::prepare::{prepare, PrepareConfig};
use llm_esr_runtime::candle::Device;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let force = args.iter().any(|a| a == "--force");
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    if pos.len() < 3 {
        anyhow::bail!("usage: embed SOURCE_DIR OUT_DIR MODEL_DIR [--force] [--batch-size=N] [--max-batch-tokens=N]");
    }
    let batch = args
        .iter()
        .find_map(|a| a.strip_prefix("--batch-size="))
        .map(|v| v.parse::<usize>())
        .transpose()?
        .unwrap_or(64);
    let max_batch_tokens = args
        .iter()
        .find_map(|a| a.strip_prefix("--max-batch-tokens="))
        .map(|v| v.parse::<usize>())
        .transpose()?
        .unwrap_or(EmbedConfig::default().max_batch_tokens);
    let src = PathBuf::from(pos[0]);
    let out = PathBuf::from(pos[1]);
    let data_dir = out.join("dataset");
    let art_dir = out.join("artifacts");

    let t = Instant::now();
    let pcfg = PrepareConfig {
        interactions: src.join("inter.txt"),
        ..PrepareConfig::default()
    };
    let summary = prepare(&pcfg, &data_dir)?;
    println!(
        "prepare: {} users, {} items, {} interactions in {:.2} s",
        summary.users,
        summary.items,
        summary.interactions,
        t.elapsed().as_secs_f64()
    );

    let ecfg = EmbedConfig {
        model: PathBuf::from(pos[2]),
        batch_size: batch,
        max_batch_tokens,
        ..EmbedConfig::default()
    };
    let t = Instant::now();
    let s = embed(&ecfg, &data_dir, &art_dir, force)?;
    let total = t.elapsed().as_secs_f64();
    for st in &s.stages {
        let rate = match st.name.as_str() {
            "item_emb" if st.seconds > 0.0 => {
                format!(", {:.1} items/s", s.items as f64 / st.seconds)
            }
            "user_emb" if st.seconds > 0.0 => {
                format!(", {:.1} users/s", s.users as f64 / st.seconds)
            }
            _ => String::new(),
        };
        println!(
            "{:<10} {:?} {:?} in {:.2} s{rate}",
            st.name, st.status, st.shape, st.seconds
        );
    }
    println!(
        "embed total {:.2} s; explained variance of {} components: {:.4}",
        total, s.pca_dim, s.explained_variance
    );
    let a = Artifacts::load(&art_dir, summary.items, summary.users, &Device::Cpu)?;
    println!(
        "loaded: item_emb {:?}, user_emb {:?}, pca {:?}, neighbours {:?}",
        a.item_emb.dims(),
        a.user_emb.as_ref().map(|u| u.dims().to_vec()),
        a.pca.dims(),
        a.neighbours.dims()
    );
    Ok(())
}
