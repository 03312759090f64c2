//! Benchmark: the SASRec backbone called through its loaded shared library
//! against the same code linked into this binary, on the same parameters and
//! inputs (beauty5-sized batch: 128 x 50 x 64, 2 blocks). Forward + backward,
//! interleaved so that machine noise hits both sides alike; prints the medians
//! and their ratio as JSON.
//!
//!     cargo build --release --workspace
//!     CANDLE_NUM_THREADS=1 cargo run --release -p llm-esr-tests --example plugin_overhead [ROUNDS]

use std::time::Instant;

use anyhow::{Context, Result};
use llm_esr_orch::plugin_host;
use llm_esr_runtime::candle::{Device, Tensor};
use llm_esr_runtime::params::ParamStore;
use llm_esr_runtime::{Backbone, BackboneSpec, ForwardCtx, Rng};

fn spec() -> BackboneSpec {
    BackboneSpec {
        hidden: 64,
        max_len: 50,
        dropout: 0.5,
        config: serde_json::json!({"layers": 2, "heads": 1}),
    }
}

/// One training-mode forward and backward; returns milliseconds.
fn step(backbone: &dyn Backbone, x: &Tensor, mask: &Tensor, seed: u64) -> Result<f64> {
    let t0 = Instant::now();
    let mut rng = Rng::new(seed);
    let mut ctx = ForwardCtx::new(true, &mut rng);
    let out = backbone.encode(x, mask, &mut ctx)?;
    let grads = out.sqr()?.sum_all()?.backward()?;
    std::hint::black_box(grads);
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let rounds: usize = match std::env::args().nth(1) {
        Some(s) => s.parse().context("ROUNDS must be a number")?,
        None => 30,
    };
    let dev = Device::Cpu;
    let spec = spec();
    let local_store = ParamStore::new(7);
    let cfg = serde_json::from_value(spec.config.clone())?;
    let local = llm_esr_plugin_sasrec::SasRec::load(local_store.var_builder(&dev), &spec, cfg)?;
    let path = llm_esr_tests::plugin_file("llm_esr_plugin_sasrec");
    let (_, plugin) = plugin_host::load_path(&path)?;
    let plugin_store = ParamStore::new(7);
    let loaded =
        plugin_host::build_backbone(plugin, "sasrec", plugin_store.var_builder(&dev), &spec)?;

    let (b, l, d) = (128, 50, 64);
    let mut data = Rng::new(11);
    let x: Vec<f32> = (0..b * l * d).map(|_| data.normal() as f32).collect();
    let x = Tensor::from_vec(x, (b, l, d), &dev)?;
    // Realistic padding: row r holds 1 + (r * 7) % l items, left-padded.
    let mask: Vec<f32> = (0..b * l)
        .map(|k| ((k % l) >= l - 1 - ((k / l) * 7) % l) as u8 as f32)
        .collect();
    let mask = Tensor::from_vec(mask, (b, l), &dev)?;

    for seed in 0..3 {
        step(&local, &x, &mask, seed)?;
        step(&loaded, &x, &mask, seed)?;
    }
    let (mut a, mut p) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let seed = 100 + round as u64;
        // Alternate which side goes first.
        if round % 2 == 0 {
            a.push(step(&local, &x, &mask, seed)?);
            p.push(step(&loaded, &x, &mask, seed)?);
        } else {
            p.push(step(&loaded, &x, &mask, seed)?);
            a.push(step(&local, &x, &mask, seed)?);
        }
    }
    let (ma, mp) = (median(a), median(p));
    let report = serde_json::json!({
        "batch": [b, l, d],
        "rounds": rounds,
        "in_process_median_ms": ma,
        "plugin_median_ms": mp,
        "plugin_over_in_process": mp / ma,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
