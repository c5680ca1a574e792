//! The two layouts of RoPE settings in config.json: the older top-level `rope_theta` and
//! `rope_scaling`, and transformers 5's `rope_parameters`. Either is read; both together must agree;
//! what cannot be read as transformers reads it is refused, naming the key. (Logits against
//! transformers for the new layout: tests/against_transformers.rs.)
mod common;
use common::*;
use distill::model::{self, LlamaConfig, RopeScaling};
use serde_json::{json, Value};
use std::path::Path;
use tch::Device;

/// A tiny Llama config.json with `rope` merged in at the top level.
fn config(rope: Value) -> String {
    let mut v = json!({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    });
    for (k, x) in rope.as_object().unwrap() {
        v[k] = x.clone();
    }
    v.to_string()
}

fn read(rope: Value) -> Result<LlamaConfig, String> {
    LlamaConfig::from_hf_json(&config(rope), Path::new("m/config.json")).map_err(|e| e.to_string())
}

fn llama3(omp: u64) -> RopeScaling {
    RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: omp as f64,
    }
}

#[test]
fn both_layouts_are_read() {
    let l3 = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    // transformers 5, as its save_pretrained writes it
    let mut params = l3.clone();
    params["rope_theta"] = json!(500000.0);
    let c = read(json!({ "rope_parameters": params })).unwrap();
    assert_eq!((c.rope_theta, c.rope_scaling), (500000.0, llama3(8192)));
    let c = read(json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})).unwrap();
    assert_eq!((c.rope_theta, c.rope_scaling), (1e6, RopeScaling::None));
    // the older layout; `type` for `rope_type`
    let c = read(json!({"rope_theta": 500000.0, "rope_scaling": l3})).unwrap();
    assert_eq!((c.rope_theta, c.rope_scaling), (500000.0, llama3(8192)));
    let c = read(json!({"rope_scaling": {"type": "linear", "factor": 2.0}})).unwrap();
    assert_eq!(
        (c.rope_theta, c.rope_scaling),
        (10000.0, RopeScaling::Linear { factor: 2.0 })
    );
    // both, agreeing (what our writer saves); a base only at the top level fills rope_parameters
    let c = read(json!({"rope_theta": 500000.0, "rope_scaling": l3, "rope_parameters": params}))
        .unwrap();
    assert_eq!((c.rope_theta, c.rope_scaling), (500000.0, llama3(8192)));
    let c = read(json!({"rope_theta": 2e4, "rope_parameters": {"rope_type": "default"}})).unwrap();
    assert_eq!((c.rope_theta, c.rope_scaling), (2e4, RopeScaling::None));
    // neither: transformers' default base
    let c = read(json!({})).unwrap();
    assert_eq!((c.rope_theta, c.rope_scaling), (10000.0, RopeScaling::None));
}

#[test]
fn our_config_json_reads_back_in_both_layouts() {
    for scaling in [
        RopeScaling::None,
        RopeScaling::Linear { factor: 4.0 },
        llama3(8),
    ] {
        let mut cfg = LlamaConfig::tiny(64, 32, 2, 4, 2);
        cfg.rope_theta = 123456.0;
        cfg.rope_scaling = scaling;
        let written = cfg.to_hf_json();
        let p = Path::new("config.json");
        assert_eq!(
            LlamaConfig::from_hf_json(&written.to_string(), p).unwrap(),
            cfg
        );
        // each layout alone says the same
        for drop in [&["rope_parameters"][..], &["rope_theta", "rope_scaling"]] {
            let mut one = written.clone();
            for k in drop {
                one.as_object_mut().unwrap().remove(*k);
            }
            assert_eq!(
                LlamaConfig::from_hf_json(&one.to_string(), p).unwrap(),
                cfg,
                "without {drop:?}"
            );
        }
    }
}

#[test]
fn disagreeing_or_unsupported_rope_settings_are_refused() {
    let cases = [
        // the bases differ
        (
            json!({"rope_theta": 10000.0,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
            "key 'rope_parameters.rope_theta'",
        ),
        // the scalings differ
        (
            json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0},
                   "rope_parameters": {"rope_type": "default"}}),
            "key 'rope_parameters': the scaling is none (rope_type default) here but linear",
        ),
        // "rope_scaling": null says "no scaling"
        (
            json!({"rope_scaling": null, "rope_parameters": {"rope_type": "linear",
                   "factor": 2.0}}),
            "key 'rope_parameters'",
        ),
        // transformers 5 takes a non-null rope_scaling in place of rope_parameters, whose base it
        // then never sees (it would use 10000)
        (
            json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0},
                   "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                       "rope_theta": 500000.0}}),
            "key 'rope_parameters.rope_theta'",
        ),
        (
            json!({"rope_theta": 10000.0,
                   "rope_scaling": {"rope_type": "default", "rope_theta": 500000.0}}),
            "key 'rope_scaling.rope_theta'",
        ),
        // unknown or unsupported kinds, in either place
        (
            json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}),
            "key 'rope_parameters.rope_type': 'yarn' is not supported",
        ),
        (
            json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}}),
            "key 'rope_scaling.type': 'dynamic' is not supported",
        ),
        (
            json!({"rope_parameters": {"rope_type": 3}}),
            "key 'rope_parameters.rope_type'",
        ),
        // a llama3 key missing
        (
            json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 5e5}}),
            "key 'rope_parameters.original_max_position_embeddings': missing",
        ),
        (
            json!({"rope_parameters": {"rope_type": "default", "rope_theta": "big"}}),
            "key 'rope_parameters.rope_theta'",
        ),
        (
            json!({"rope_parameters": 5}),
            "key 'rope_parameters': expected an object",
        ),
        // settings we do not implement
        (
            json!({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}),
            "key 'rope_parameters.partial_rotary_factor'",
        ),
        (
            json!({"partial_rotary_factor": 0.5}),
            "key 'partial_rotary_factor'",
        ),
        (
            json!({"rope_parameters": {"full_attention": {"rope_type": "default"},
                   "sliding_attention": {"rope_type": "default"}}}),
            "key 'rope_parameters.full_attention'",
        ),
    ];
    for (rope, needle) in cases {
        match read(rope.clone()) {
            Ok(c) => panic!(
                "{rope} accepted as theta {} {:?}",
                c.rope_theta, c.rope_scaling
            ),
            Err(e) => assert!(
                e.starts_with("m/config.json: ") && e.contains(needle),
                "{rope}: {e}"
            ),
        }
    }
}

/// Through the binary: one `distill:` line naming the file and the key.
#[test]
fn the_binary_names_the_disagreeing_key() {
    let m = model::random(&LlamaConfig::tiny(64, 32, 2, 4, 2), Device::Cpu, 1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    m.save_hf(tmp.path()).unwrap();
    let path = tmp.path().join("config.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["rope_parameters"]["rope_theta"] = json!(500000.0);
    std::fs::write(&path, v.to_string()).unwrap();
    let out = distill(&["inspect", tmp.path().to_str().unwrap()]);
    assert_clean_failure(
        &out,
        &[
            path.to_str().unwrap(),
            "rope_parameters.rope_theta",
            "500000",
            "10000",
        ],
    );
}
