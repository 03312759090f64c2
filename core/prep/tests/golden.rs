//! Golden test: all-MiniLM-L6-v2 embeddings and WordPiece tokens against the
//! sentence-transformers reference in `all-MiniLM-L6-v2.reference.json`.

mod common;

use llm_esr_prep::encoder::SentenceEncoder;
use llm_esr_runtime::candle::Device;

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_matches_sentence_transformers() {
    let reference_path = common::models().join("all-MiniLM-L6-v2.reference.json");
    let text = std::fs::read_to_string(&reference_path).expect("reading the reference json");
    let reference: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).expect("parsing the reference json");
    assert!(reference.len() >= 3, "reference has too few sentences");

    let enc = SentenceEncoder::load(&common::minilm(), &Device::Cpu, None).expect("loading model");
    assert_eq!(enc.dim(), 384);
    assert_eq!(enc.max_tokens(), 512);

    let sentences: Vec<String> = reference.keys().cloned().collect();
    // Batch size 2 with length sorting and padding; the order must come back.
    let emb = enc.encode(&sentences, 2, "golden").expect("encoding");
    let rows: Vec<Vec<f32>> = emb.to_vec2().expect("to_vec2");
    let single = enc.encode(&sentences, 1, "golden").expect("encoding");
    let single: Vec<Vec<f32>> = single.to_vec2().expect("to_vec2");
    for (i, s) in sentences.iter().enumerate() {
        let r = &reference[s];
        let want_tokens: Vec<String> = r["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| t.as_str().expect("token").to_string())
            .collect();
        assert_eq!(
            enc.tokens(s).expect("tokenize"),
            want_tokens,
            "tokens of `{s}`"
        );
        let want: Vec<f32> = r["embedding"]
            .as_array()
            .expect("embedding")
            .iter()
            .map(|v| v.as_f64().expect("number") as f32)
            .collect();
        let c = cosine(&rows[i], &want);
        assert!(c >= 0.9999, "cosine {c} < 0.9999 for `{s}`");
        let c1 = cosine(&single[i], &rows[i]);
        assert!(
            c1 >= 0.999999,
            "batching changed the embedding of `{s}`: {c1}"
        );
        let norm: f64 = rows[i]
            .iter()
            .map(|x| (*x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "not L2-normalised: {norm}");
    }
}

#[test]
fn long_text_is_truncated_not_rejected() {
    let enc = SentenceEncoder::load(&common::minilm(), &Device::Cpu, Some(64)).expect("loading");
    let long = "lipstick ".repeat(300);
    assert_eq!(enc.tokens(&long).expect("tokenize").len(), 64);
    let e = enc
        .encode(&[long, "short".to_string()], 8, "t")
        .expect("encode");
    assert_eq!(e.dims(), &[2, 384]);
}
