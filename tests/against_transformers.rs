//! The demo teacher (SmolLM2-135M, GGUF) converted by `distill convert` is the same model that
//! Python `transformers` runs: logits, perplexity, token ids, generation, and save/load round trips.
mod common;
use common::*;
use distill::model::{self, LlamaConfig, Tokenizer};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::{Device, Tensor};

/// One converted demo teacher per test binary.
fn converted() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("smollm2");
        let run = distill(&[
            "convert",
            demo_teacher().to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        (tmp, out)
    })
    .1
}

const TEXT: &str =
    "The quality of mercy is not strain'd; it droppeth as the gentle rain from heaven \
upon the place beneath. It is twice blest: it blesseth him that gives and him that takes.";

#[test]
fn logits_match_transformers() {
    let dir = converted();
    let m = model::load(dir, Device::Cpu).unwrap();
    let ids = m.tokenizer.as_ref().unwrap().encode(TEXT, true).unwrap();
    assert!(ids.len() > 30);
    let tmp = tempfile::tempdir().unwrap();
    let ids_json = tmp.path().join("ids.json");
    std::fs::write(&ids_json, serde_json::to_string(&ids).unwrap()).unwrap();
    let out = tmp.path().join("ref.safetensors");
    reference(&[
        "logits",
        dir.to_str().unwrap(),
        ids_json.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let expected = read_tensor(&out, "logits");
    let x = Tensor::from_slice(&ids.iter().map(|&i| i as i64).collect::<Vec<_>>()).unsqueeze(0);
    let ours = tch::no_grad(|| m.model.forward(&x).unwrap()).squeeze_dim(0);
    assert_eq!(ours.size(), expected.size());
    let err = max_rel_err(&ours, &expected);
    assert!(err < 1e-4, "max relative error {err}");
    // the GGUF loaded directly gives the same logits as its converted folder
    let g = model::load(&demo_teacher(), Device::Cpu).unwrap();
    let from_gguf = tch::no_grad(|| g.model.forward(&x).unwrap()).squeeze_dim(0);
    assert_eq!(max_rel_err(&from_gguf, &ours), 0.0);
}

#[test]
fn perplexity_matches_transformers() {
    let dir = converted();
    let text = demo_texts().join("tempest_gut.txt");
    let out = distill(&[
        "eval",
        dir.to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
        "--seq-len",
        "256",
        "--max-tokens",
        "1024",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let field = |k: &str| -> f64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("no '{k}' in {stdout}"))
            .trim()
            .parse()
            .unwrap()
    };
    let ours = field("perplexity:");
    assert_eq!(field("tokens:"), 1020.0); // 4 windows of 256 tokens, 255 predicted each
    assert!(field("tokens/s:") > 0.0);
    let r: serde_json::Value = serde_json::from_str(&reference(&[
        "perplexity",
        dir.to_str().unwrap(),
        text.to_str().unwrap(),
        "256",
        "1024",
    ]))
    .unwrap();
    let theirs = r["perplexity"].as_f64().unwrap();
    assert_eq!(r["tokens"].as_u64(), Some(1020));
    assert!(
        ((ours - theirs) / theirs).abs() < 1e-3,
        "ours {ours} vs transformers {theirs}"
    );
    assert!(ours > 1.0 && ours < 1000.0, "implausible perplexity {ours}");
}

#[test]
fn token_ids_match_transformers() {
    let dir = converted();
    let texts = [
        "Hello world! Numbers 1234567 and 3.14159 split into digits.",
        "Ünïcödé: naïve café, 東京, Привет мир, emoji 🤗🚀 and tabs\tand\nnewlines.\n\n  Indented.",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
        TEXT,
    ];
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("texts.json");
    std::fs::write(&f, serde_json::to_string(&texts).unwrap()).unwrap();
    let theirs: Vec<Vec<u32>> = serde_json::from_str(&reference(&[
        "tokenize",
        dir.to_str().unwrap(),
        f.to_str().unwrap(),
    ]))
    .unwrap();
    let from_folder = Tokenizer::from_hf_dir(dir).unwrap().unwrap();
    let g = distill::model::gguf::GgufFile::open(&demo_teacher()).unwrap();
    let from_gguf = Tokenizer::from_gguf(&g).unwrap();
    for (text, expected) in texts.iter().zip(&theirs) {
        assert_eq!(
            &from_folder.encode(text, true).unwrap(),
            expected,
            "{text:?}"
        );
        assert_eq!(&from_gguf.encode(text, true).unwrap(), expected, "{text:?}");
        assert_eq!(from_folder.decode(expected, false).unwrap(), *text);
    }
    // special tokens are single ids
    assert_eq!(theirs[2][0], 1);
}

#[test]
fn chat_generation_answers_paris() {
    let out = distill(&[
        "generate",
        demo_teacher().to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "24",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("Paris"), "answer: {text}");
}

#[test]
fn sampled_generation_is_seeded() {
    let args = |seed: &str| {
        let out = distill(&[
            "generate",
            demo_teacher().to_str().unwrap(),
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "12",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--seed",
            seed,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(args("7"), args("7"));
}

#[test]
fn folder_round_trip_is_exact() {
    let dir = converted();
    let a = model::load(dir, Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    a.save_hf(tmp.path()).unwrap();
    let b = model::load(tmp.path(), Device::Cpu).unwrap();
    assert_eq!(a.model.config, b.model.config);
    let (va, vb) = (a.vs.variables(), b.vs.variables());
    assert_eq!(va.len(), vb.len());
    for (name, t) in &va {
        assert!(
            t.equal(&vb[name]),
            "tensor {name} changed in the round trip"
        );
    }
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "config.json",
    ] {
        assert_eq!(
            std::fs::read(dir.join(f)).unwrap(),
            std::fs::read(tmp.path().join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn random_tiny_models_load_in_transformers_with_equal_logits() {
    let mut qwen = LlamaConfig::tiny(96, 32, 2, 4, 2);
    qwen.arch = distill::model::Arch::Qwen2;
    qwen.qkv_bias = true;
    qwen.tie_word_embeddings = false;
    let mut llama3 = LlamaConfig::tiny(128, 64, 2, 4, 1);
    llama3.rope_theta = 500000.0;
    llama3.rope_scaling = distill::model::RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8.0,
    };
    // Mistral with a sliding window shorter than the 16 test positions: the window must bind alike
    let mut mistral = LlamaConfig::tiny(80, 32, 2, 4, 2);
    mistral.arch = distill::model::Arch::Mistral;
    mistral.sliding_window = Some(6);
    for (i, cfg) in [LlamaConfig::tiny(64, 32, 2, 4, 2), qwen, llama3, mistral]
        .into_iter()
        .enumerate()
    {
        let m = model::random(&cfg, Device::Cpu, 10 + i as i64).unwrap();
        // biases start at zero; give them values so that a dropped bias shows
        tch::no_grad(|| {
            for (name, mut v) in m.vs.variables() {
                if name.ends_with(".bias") {
                    v.copy_(&(Tensor::randn(v.size(), (tch::Kind::Float, Device::Cpu)) * 0.5));
                }
            }
        });
        let tmp = tempfile::tempdir().unwrap();
        m.save_hf(tmp.path()).unwrap();
        let out = tmp.path().join("ref.safetensors");
        reference(&[
            "random_model_logits",
            tmp.path().to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        let ids: Vec<i64> = (0..16)
            .map(|i| (7 * i + 3) % cfg.vocab_size as i64)
            .collect();
        let ours = tch::no_grad(|| {
            m.model
                .forward(&Tensor::from_slice(&ids).unsqueeze(0))
                .unwrap()
        })
        .squeeze_dim(0);
        let err = max_rel_err(&ours, &read_tensor(&out, "logits"));
        assert!(err < 1e-5, "config #{i}: max relative error {err}");
    }
}

/// config.json in transformers 5's layout, as transformers itself writes it: `rope_parameters`
/// holding the base and the scaling, no top-level `rope_theta` or `rope_scaling`. Our reader must
/// find the same base and scaling and give the same logits; transformers must read our writer's
/// file (both layouts) as we meant it. Bases ≠ 10000, so a reader that falls back to the default
/// base fails here.
#[test]
fn rope_parameters_layout_reads_like_transformers() {
    let mut default = LlamaConfig::tiny(64, 64, 2, 4, 2);
    default.rope_theta = 500000.0;
    let mut llama3 = LlamaConfig::tiny(96, 64, 2, 4, 1);
    llama3.rope_theta = 500000.0;
    llama3.rope_scaling = distill::model::RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8.0,
    };
    let mut linear = LlamaConfig::tiny(80, 32, 2, 4, 2);
    linear.rope_theta = 20000.0;
    linear.rope_scaling = distill::model::RopeScaling::Linear { factor: 2.0 };
    for (i, cfg) in [default, llama3, linear].into_iter().enumerate() {
        let m = model::random(&cfg, Device::Cpu, 20 + i as i64).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let (ours, theirs) = (tmp.path().join("ours"), tmp.path().join("theirs"));
        m.save_hf(&ours).unwrap();
        // transformers reads our config.json and writes it back in its own layout
        let read: serde_json::Value = serde_json::from_str(&reference(&[
            "resave_config",
            ours.to_str().unwrap(),
            theirs.to_str().unwrap(),
        ]))
        .unwrap();
        assert_eq!(read["rope_theta"].as_f64(), Some(cfg.rope_theta), "#{i}");
        let kind = match cfg.rope_scaling {
            distill::model::RopeScaling::None => "default",
            distill::model::RopeScaling::Linear { .. } => "linear",
            distill::model::RopeScaling::Llama3 { .. } => "llama3",
        };
        assert_eq!(read["rope_type"].as_str(), Some(kind), "#{i}");
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(theirs.join("config.json")).unwrap()).unwrap();
        assert!(
            written.get("rope_theta").is_none()
                && written.get("rope_scaling").is_none()
                && written["rope_parameters"]["rope_theta"].as_f64() == Some(cfg.rope_theta),
            "#{i}: transformers no longer writes the layout this test is about: {written}"
        );
        std::fs::copy(
            ours.join("model.safetensors"),
            theirs.join("model.safetensors"),
        )
        .unwrap();
        let loaded = model::load(&theirs, Device::Cpu).unwrap();
        assert_eq!(loaded.model.config.rope_theta, cfg.rope_theta, "#{i}");
        assert_eq!(loaded.model.config.rope_scaling, cfg.rope_scaling, "#{i}");
        let out = tmp.path().join("ref.safetensors");
        reference(&[
            "random_model_logits",
            theirs.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        let ids: Vec<i64> = (0..16)
            .map(|i| (7 * i + 3) % cfg.vocab_size as i64)
            .collect();
        let logits = tch::no_grad(|| {
            loaded
                .model
                .forward(&Tensor::from_slice(&ids).unsqueeze(0))
                .unwrap()
        })
        .squeeze_dim(0);
        // Both sides compute in f32 and differ only in the order of their sums. A sum of n f32
        // terms is off by at most (n − 1)·u·Σ|terms| (u = 2^-24 ≈ 6e-8). Along the path to one
        // logit the sums are at most 128 terms long (the MLP's down projection) and about 13 deep
        // (per layer: norm, q/k/v, scores, softmax, ·v, o, norm, gate/up, down; then norm and
        // head), so their errors add up to ≲ 13 · 128 · u ≈ 1e-4 of the logits' scale: the
        // bound DESIGN.md §6 sets for model code.
        let err = max_rel_err(&logits, &read_tensor(&out, "logits"));
        assert!(err < 1e-4, "config #{i}: max relative error {err}");
    }
}
