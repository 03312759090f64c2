//! The plugin boundary: gradients through a loaded plugin, refusal of a plugin
//! from another build, and panics turned into errors.

use llm_esr_orch::plugin_host;
use llm_esr_runtime::candle::{Device, Tensor, Var};
use llm_esr_runtime::params::ParamStore;
use llm_esr_runtime::{Backbone, BackboneSpec, ForwardCtx, Rng};
use llm_esr_tests::plugin_file;

fn spec() -> BackboneSpec {
    BackboneSpec {
        hidden: 16,
        max_len: 12,
        dropout: 0.3,
        config: serde_json::json!({"layers": 2, "heads": 2}),
    }
}

/// Runs one training-mode forward and backward; returns the gradients of the
/// parameters (by name) and of the input.
fn gradients(backbone: &dyn Backbone, store: &ParamStore) -> Vec<(String, Vec<f32>)> {
    let dev = Device::Cpu;
    let (b, l, d) = (3, 8, 16);
    let mut data_rng = Rng::new(11);
    let x: Vec<f32> = (0..b * l * d).map(|_| data_rng.normal() as f32).collect();
    let x = Var::from_tensor(&Tensor::from_vec(x, (b, l, d), &dev).unwrap()).unwrap();
    let mut mask = vec![1f32; b * l];
    mask[8..8 + 3].iter_mut().for_each(|m| *m = 0.0); // row 1: 3 padding positions
    mask[16..16 + 6].iter_mut().for_each(|m| *m = 0.0); // row 2: 6 padding positions
    let mask = Tensor::from_vec(mask, (b, l), &dev).unwrap();
    let w: Vec<f32> = (0..b * l * d).map(|_| data_rng.normal() as f32).collect();
    let w = Tensor::from_vec(w, (b, l, d), &dev).unwrap();
    let mut rng = Rng::new(5);
    let mut ctx = ForwardCtx::new(true, &mut rng);
    let out = backbone.encode(x.as_tensor(), &mask, &mut ctx).unwrap();
    let loss = (out * w).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let mut result = vec![(
        "<input>".to_string(),
        grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap(),
    )];
    for (name, var) in store.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("parameter {name} received no gradient"));
        result.push((name, g.flatten_all().unwrap().to_vec1().unwrap()));
    }
    result
}

#[test]
fn gradients_through_a_loaded_plugin_equal_in_process_ones() {
    let spec = spec();
    let local_store = ParamStore::new(7);
    let cfg = serde_json::from_value(spec.config.clone()).unwrap();
    let local =
        llm_esr_plugin_sasrec::SasRec::load(local_store.var_builder(&Device::Cpu), &spec, cfg)
            .unwrap();

    let (info, plugin) = plugin_host::load_path(&plugin_file("llm_esr_plugin_sasrec")).unwrap();
    assert_eq!(info.name, "sasrec");
    let plugin_store = ParamStore::new(7);
    let loaded = plugin_host::build_backbone(
        plugin,
        "sasrec",
        plugin_store.var_builder(&Device::Cpu),
        &spec,
    )
    .unwrap();

    let a = gradients(&local, &local_store);
    let b = gradients(&loaded, &plugin_store);
    assert_eq!(a.len(), b.len());
    assert!(
        a.len() > 20,
        "expected every SASRec parameter, got {}",
        a.len()
    );
    for ((na, ga), (nb, gb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ga.iter().any(|&g| g != 0.0), "{na}: all-zero gradient");
        let diff = ga
            .iter()
            .zip(gb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-7, "{na}: gradients differ by {diff}");
    }
}

#[test]
fn a_plugin_from_another_runtime_is_refused() {
    let path = plugin_file("llm_esr_fixture_stale");
    let found = plugin_host::inspect(&path);
    let why = found.refused.expect("stale plugin must be refused");
    assert!(why.contains("fingerprint"), "{why}");
    assert!(why.contains("rebuild the workspace"), "{why}");
    let err = plugin_host::load_path(&path).err().expect("load must fail");
    assert!(format!("{err:#}").contains("refused"), "{err:#}");
}

#[test]
fn a_panicking_plugin_gives_an_error() {
    let (_, plugin) = plugin_host::load_path(&plugin_file("llm_esr_fixture_panic")).unwrap();
    let store = ParamStore::new(1);
    let err =
        plugin_host::build_backbone(plugin, "panicky", store.var_builder(&Device::Cpu), &spec())
            .err()
            .expect("build must fail");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("panicked") && msg.contains("deliberate panic"),
        "{msg}"
    );
}
