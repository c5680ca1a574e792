//! GGUF export (`distill convert MODEL OUT.gguf --type f16|q8_0|q4_k`): gguf-py (llama.cpp's Python
//! package) reads every file we write, its dequantised tensors equal ours, the metadata is what
//! llama.cpp expects; the quantisers equal ggml's reference algorithms byte for byte; our reader
//! gives back the model; the demo teacher survives HF → GGUF → our reader with its tokenizer and
//! chat template; and, where llama.cpp's library is installed (scripts/get-llama-cpp.sh), llama.cpp
//! itself loads the files, tokenizes as we do and computes the same logits.
mod common;
use common::*;
use distill::model::gguf::{GgmlType, GgufFile, Value};
use distill::model::gguf_quant::quantize;
use distill::model::gguf_write::{hf_to_gguf_name, OutType};
use distill::model::{self, Arch, LlamaConfig, LoadedModel, Tokenizer};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Run tests/python/gguf_write_ref.py with `args`.
fn gguf_py(args: &[&str]) {
    python_script("gguf_write_ref.py", args);
}

/// llama.cpp's CPU library (the llama-cpp-cffi wheel unpacked by scripts/get-llama-cpp.sh, which
/// scripts/setup.sh runs): `$DISTILL_LLAMA_CPP`, else `~/.cache/distill/llama-cpp`. Missing, the
/// test fails (a check is never skipped).
fn llama_cpp_dir() -> PathBuf {
    let dir = std::env::var_os("DISTILL_LLAMA_CPP")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("DISTILL_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/distill")
                })
                .join("llama-cpp")
        });
    let found = std::fs::read_dir(dir.join("llama")).is_ok_and(|mut rd| {
        rd.any(|e| {
            e.is_ok_and(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("_llama_cpp_cpu")
            })
        })
    });
    assert!(
        found,
        "llama.cpp's library is not installed in {}: run scripts/setup.sh (it runs scripts/get-llama-cpp.sh)",
        dir.display()
    );
    dir
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// 256 × 24 values that reach the quantisers' corners: Gaussian blocks at weight scale, zeros, a
/// constant, values far below f16's range (d underflows to 0), large values, a lone outlier,
/// all-positive and all-negative blocks, exact half-steps (ties), ±max in one Q5_0 block (the
/// clamp at 31), and a sub-block much quieter than its super-block (6-bit scales near 0).
fn corner_values() -> Vec<f32> {
    tch::manual_seed(7);
    let mut x =
        Vec::<f32>::try_from(Tensor::randn([256 * 24], (Kind::Float, Device::Cpu)) * 0.02).unwrap();
    let mut block = |i: usize, f: &dyn Fn(usize, f32) -> f32| {
        for j in 0..256 {
            x[256 * i + j] = f(j, x[256 * i + j]);
        }
    };
    block(1, &|_, _| 0.0);
    block(2, &|_, _| 0.375);
    block(3, &|_, v| v * 1e-30);
    block(4, &|_, v| v * 5e4);
    block(5, &|j, v| if j == 77 { 3.0 } else { v });
    block(6, &|_, v| v.abs() + 0.01);
    block(7, &|_, v| -v.abs());
    block(8, &|j, _| (j % 32) as f32 * 0.5 - 7.75);
    block(9, &|j, v| match j % 32 {
        0 => 0.5,
        1 => -0.5,
        _ => v,
    });
    block(10, &|j, v| if j < 32 { v * 1e-3 } else { v });
    block(11, &|j, v| if j >= 224 { v * 40.0 } else { v });
    x
}

#[test]
fn quantisers_equal_ggml_reference_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let x = corner_values();
    let input = dir.path().join("x.f32");
    std::fs::write(&input, f32_bytes(&x)).unwrap();
    let reference = |cmd: &[&str]| {
        let out = dir.path().join("ref.bin");
        let mut args = cmd.to_vec();
        args.extend([input.to_str().unwrap(), out.to_str().unwrap()]);
        gguf_py(&args);
        std::fs::read(out).unwrap()
    };
    // gguf-py implements F16, Q8_0 and Q5_0 "bit-exact as ggml's reference"
    for (ty, name) in [
        (GgmlType::F16, "F16"),
        (GgmlType::Q8_0, "Q8_0"),
        (GgmlType::Q5_0, "Q5_0"),
    ] {
        let ours = quantize(ty, &x).unwrap();
        assert_eq!(ours, reference(&["quantize", name]), "{name}");
    }
    // gguf-py has no Q4_K quantiser: the plain port of quantize_row_q4_K_ref in the script, and
    // ggml's own where llama.cpp's library is installed
    let ours = quantize(GgmlType::Q4_K, &x).unwrap();
    assert_eq!(ours.len(), 24 * 144);
    assert_eq!(
        ours,
        reference(&["q4k_plain"]),
        "Q4_K against the plain port"
    );
    let lib = llama_cpp_dir();
    assert_eq!(
        ours,
        reference(&["q4k_ggml", lib.to_str().unwrap()]),
        "Q4_K against ggml's quantize_row_q4_K_ref"
    );
    // a long input is quantised in pieces on all cores: the bytes of its blocks one by one
    let long =
        Vec::<f32>::try_from(Tensor::randn([256 * 1100], (Kind::Float, Device::Cpu))).unwrap();
    for ty in [
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
    ] {
        let blockwise: Vec<u8> = long
            .chunks(256)
            .flat_map(|c| quantize(ty, c).unwrap())
            .collect();
        assert_eq!(quantize(ty, &long).unwrap(), blockwise, "{ty:?}");
    }
}

/// Round trip error bounds, from the block formats (`d16` = d rounded to f16, relative error
/// ≤ 2^-11, plus an absolute 2^-25 where it is subnormal):
/// - Q8_0: q = round(x/d), d = amax/127, |q| ≤ 127: |x − q·d16| ≤ d/2 + 127·|d − d16|
///   ≤ amax·(1/254 + 2^-11) + 127·2^-25.
/// - Q5_0: d = m/−16 for the x of largest magnitude m; x/d ∈ [−16, 16], q − 16 = trunc(x/d + 16.5)
///   − 16 clamped at 15, so |x − (q−16)·d| ≤ |d|/2 except x = −m (x/d = 16, clamped: error |d|);
///   with f16: ≤ |d| + 16·(2^-11·|d| + 2^-25).
#[test]
fn q8_0_and_q5_0_round_trips_stay_within_their_bounds() {
    let x = corner_values();
    for ty in [GgmlType::Q8_0, GgmlType::Q5_0] {
        let bytes = quantize(ty, &x).unwrap();
        let mut back = vec![0f32; x.len()];
        distill::model::gguf::dequantize_into(ty, &bytes, &mut back);
        for (b, (xs, ys)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let bound = match ty {
                GgmlType::Q8_0 => amax * (1.0 / 254.0 + 2f64.powi(-11)) + 127.0 * 2f64.powi(-25),
                _ => amax / 16.0 * (1.0 + 16.0 * 2f64.powi(-11)) + 16.0 * 2f64.powi(-25),
            } * (1.0 + 1e-6);
            for (a, b2) in xs.iter().zip(ys) {
                let err = (*a as f64 - *b2 as f64).abs();
                assert!(
                    err <= bound,
                    "{ty:?} block {b}: |{a} − {b2}| = {err} > {bound}"
                );
            }
        }
    }
}

/// A tiny random Llama with a byte-level tokenizer (256 bytes + 2 specials, vocabulary padded to
/// 260): hidden 256 so Q4_K fits the square weights; `intermediate` picks what ffn_down's rows
/// (its inner dimension) fall back to; `untied_with_biases`: an lm_head and biases everywhere;
/// `qwen2`: the Qwen2 architecture (q/k/v biases, no permutation in GGUF).
fn tiny_model(intermediate: usize, untied_with_biases: bool, qwen2: bool) -> LoadedModel {
    let c = LlamaConfig {
        arch: if qwen2 { Arch::Qwen2 } else { Arch::Llama },
        intermediate_size: intermediate,
        tie_word_embeddings: !untied_with_biases,
        qkv_bias: untied_with_biases || qwen2,
        o_bias: untied_with_biases,
        mlp_bias: untied_with_biases,
        eos_token_ids: vec![256],
        rms_norm_eps: 1e-6,
        rope_theta: 50000.0,
        ..LlamaConfig::tiny(260, 256, 2, 4, 2)
    };
    let mut m = model::random(&c, Device::Cpu, 3).unwrap();
    // biases start at zero: give them values, so that the q/k bias permutation shows
    tch::no_grad(|| {
        for (name, mut v) in m.vs.variables() {
            if name.ends_with(".bias") {
                v.copy_(&(Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
    });
    m.tokenizer = Some(Tokenizer::byte_level(&["<|im_end|>", "<|im_start|>"]).unwrap());
    m.source = PathBuf::from("/models/tiny-student");
    m
}

/// The stored type the module's contract promises, written again here: 1-D → F32; F16; Q8_0 when
/// the row fills blocks of 32, else F16; Q4_K for rows of 256k, Q5_0 for 32k, else F16.
fn promised_type(ty: OutType, dims: &[u64]) -> &'static str {
    if dims.len() == 1 {
        return "F32";
    }
    match (ty, dims[0].is_multiple_of(256), dims[0].is_multiple_of(32)) {
        (OutType::F16, _, _) => "F16",
        (OutType::Q8_0, _, true) => "Q8_0",
        (OutType::Q4_K, true, _) => "Q4_K",
        (OutType::Q4_K, false, true) => "Q5_0",
        _ => "F16",
    }
}

fn logits(m: &LoadedModel, ids: &[i64]) -> Tensor {
    tch::no_grad(|| {
        m.model
            .forward(&Tensor::from_slice(ids).unsqueeze(0))
            .unwrap()
    })
}

/// A model with `like`'s config holding the tensors of a safetensors file (checkpoint names).
fn model_from_safetensors(like: &LoadedModel, path: &Path) -> LoadedModel {
    let m = model::random(&like.model.config, Device::Cpu, 0).unwrap();
    tch::no_grad(|| {
        for (name, mut v) in m.vs.variables() {
            v.copy_(&read_tensor(path, &name));
        }
    });
    m
}

#[test]
fn tiny_models_written_as_gguf_read_back_by_gguf_py_and_by_us() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<i64> = (0..24).map(|i| (i * 37 + 5) % 260).collect();
    // (intermediate 288: ffn_down rows of 9 × 32 → Q5_0 under q4_k; 264: rows fit no block → F16)
    for (intermediate, untied, qwen2) in
        [(288, false, false), (264, true, false), (512, false, true)]
    {
        let src = tiny_model(intermediate, untied, qwen2);
        let arch = if qwen2 { "qwen2" } else { "llama" };
        let c = src.model.config.clone();
        let src_logits = logits(&src, &ids);
        for ty in [OutType::F16, OutType::Q8_0, OutType::Q4_K] {
            let tag = format!("{arch}-{}-{intermediate}", ty.name());
            let path = dir.path().join(format!("{tag}.gguf"));
            let written = src.save_gguf(&path, ty).unwrap();
            assert_eq!(written.bytes, std::fs::metadata(&path).unwrap().len());
            let out = dir.path().join(&tag);
            gguf_py(&["read", path.to_str().unwrap(), out.to_str().unwrap()]);
            let meta: Json =
                serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap())
                    .unwrap();

            // the tensor table: llama.cpp's names, no output.weight when tied, the promised
            // types, data aligned to 32
            let table = meta["tensors"].as_object().unwrap();
            let mut expected: BTreeMap<String, Vec<u64>> = BTreeMap::new();
            for (name, t) in src.vs.variables() {
                let dims = t.size().iter().rev().map(|&d| d as u64).collect();
                expected.insert(hf_to_gguf_name(&name).unwrap(), dims);
            }
            assert_eq!(expected.contains_key("output.weight"), untied);
            assert_eq!(
                table.keys().cloned().collect::<Vec<_>>(),
                expected.keys().cloned().collect::<Vec<_>>(),
                "{tag}"
            );
            for (name, dims) in &expected {
                let t = &table[name];
                let got: Vec<u64> = serde_json::from_value(t["dims"].clone()).unwrap();
                assert_eq!(&got, dims, "{tag} {name}");
                assert_eq!(t["type"], promised_type(ty, dims), "{tag} {name}");
                assert_eq!(t["offset"].as_u64().unwrap() % 32, 0, "{tag} {name}");
            }

            // the metadata llama.cpp reads, with the GGUF types its converter writes
            let md = meta["metadata"].as_object().unwrap();
            let want = |key: &str, types: &[&str], value: Json| {
                let got = md.get(key).unwrap_or_else(|| panic!("{tag}: no {key}"));
                assert_eq!(got["types"], serde_json::json!(types), "{tag} {key}");
                assert_eq!(got["value"], value, "{tag} {key}");
            };
            let u32k = |key: &str, v: usize| want(key, &["UINT32"], v.into());
            want("general.architecture", &["STRING"], arch.into());
            u32k(
                "general.file_type",
                match ty {
                    OutType::F16 => 1,
                    OutType::Q8_0 => 7,
                    OutType::Q4_K => 14,
                },
            );
            u32k("general.quantization_version", 2);
            u32k(&format!("{arch}.vocab_size"), 260);
            u32k(&format!("{arch}.context_length"), c.max_position_embeddings);
            u32k(&format!("{arch}.embedding_length"), 256);
            u32k(&format!("{arch}.block_count"), 2);
            u32k(&format!("{arch}.feed_forward_length"), intermediate);
            u32k(&format!("{arch}.attention.head_count"), 4);
            u32k(&format!("{arch}.attention.head_count_kv"), 2);
            u32k(&format!("{arch}.rope.dimension_count"), 64);
            want(
                &format!("{arch}.rope.freq_base"),
                &["FLOAT32"],
                50000.0.into(),
            );
            want(
                &format!("{arch}.attention.layer_norm_rms_epsilon"),
                &["FLOAT32"],
                (1e-6f32 as f64).into(),
            );
            assert!(!md.contains_key(&format!("{arch}.attention.key_length")));
            want("tokenizer.ggml.model", &["STRING"], "gpt2".into());
            want("tokenizer.ggml.pre", &["STRING"], "gpt2".into());
            let tok = src.tokenizer.as_ref().unwrap();
            let mut tokens: Vec<String> = tok.id_tokens().into_iter().map(Option::unwrap).collect();
            tokens.extend(["[PAD258]".into(), "[PAD259]".into()]);
            want(
                "tokenizer.ggml.tokens",
                &["ARRAY", "STRING"],
                serde_json::json!(tokens),
            );
            let mut types = vec![1; 256];
            types.extend([3, 3, 5, 5]);
            want(
                "tokenizer.ggml.token_type",
                &["ARRAY", "INT32"],
                serde_json::json!(types),
            );
            want("tokenizer.ggml.eos_token_id", &["UINT32"], 256.into());
            want("tokenizer.ggml.add_bos_token", &["BOOL"], false.into());
            want(
                "tokenizer.chat_template",
                &["STRING"],
                tok.chat_template.clone().unwrap().into(),
            );

            // every tensor dequantises in our reader exactly as in gguf-py
            let g = GgufFile::open(&path).unwrap();
            let dequant = out.join("dequant.safetensors");
            for info in &g.tensors {
                let ours = Tensor::from_slice(&g.dequantize(info).unwrap()).reshape(info.shape());
                let theirs = read_tensor(&dequant, &info.name);
                assert!(ours.equal(&theirs), "{tag} {}", info.name);
            }

            // our reader's model = the model gguf-py's tensors make once the script un-permutes
            // q/k itself; so are its logits
            let back = model::load(&path, Device::Cpu).unwrap();
            assert_eq!(back.model.config.tie_word_embeddings, !untied);
            let theirs = model_from_safetensors(&back, &out.join("hf.safetensors"));
            let vars = back.vs.variables();
            for (name, t) in theirs.vs.variables() {
                assert!(vars[&name].equal(&t), "{tag} {name}");
            }
            let got = logits(&back, &ids);
            assert!(got.equal(&logits(&theirs, &ids)), "{tag}");
            let rel = max_rel_err(&got, &src_logits);
            eprintln!("{tag}: logits vs the source model: max |Δ| / max |logit| = {rel:.2e}");
            if ty == OutType::F16 {
                // each weight rounds with relative error ≤ 2^-11 ≈ 4.9e-4; a logit passes through
                // 2 layers × 7 projections and the head, errors adding to first order: ≤ 15 × 2^-11
                // ≈ 7.3e-3 of the scale of the products (|W||x|), bounded by 1e-2 here
                assert!(rel < 1e-2, "{tag}: {rel}");
            }
        }
    }
}

#[test]
fn refusals_name_what_cannot_be_exported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut m = tiny_model(288, false, false);
    m.tokenizer = None;
    let e = m.save_gguf(&path, OutType::F16).unwrap_err().to_string();
    assert!(e.contains("no tokenizer"), "{e}");
    let mut m = tiny_model(288, false, false);
    m.model.config.sliding_window = Some(128);
    let e = m.save_gguf(&path, OutType::F16).unwrap_err().to_string();
    assert!(e.contains("sliding_window") && e.contains("128"), "{e}");
    let mut m = tiny_model(288, false, false);
    m.model.config.rope_scaling = model::RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 128.0,
    };
    let e = m.save_gguf(&path, OutType::F16).unwrap_err().to_string();
    assert!(e.contains("rope_scaling"), "{e}");
    // tokenizers llama.cpp's gpt2 model cannot represent: SentencePiece-style BPE (byte
    // fallback), a pre-tokenizer without a llama.cpp name; and ids beyond the model's vocabulary
    let bpe = |pre: Json, fallback: bool, vocab: usize| {
        let v: serde_json::Map<String, Json> = (0..vocab)
            .map(|i| (format!("t{i}"), Json::from(i)))
            .collect();
        let tj = serde_json::json!({"version": "1.0", "added_tokens": [], "normalizer": null,
            "pre_tokenizer": pre, "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "vocab": v, "merges": [], "byte_fallback": fallback}});
        Tokenizer::from_json(tj.to_string(), None, Path::new("tokenizer.json")).unwrap()
    };
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    for (tok, needle) in [
        (bpe(Json::Null, true, 8), "byte fallback"),
        (
            bpe(serde_json::json!({"type": "Whitespace"}), false, 8),
            "pre_tokenizer",
        ),
        (
            bpe(byte_level, false, 300),
            "beyond the model's vocabulary of 260",
        ),
    ] {
        let mut m = tiny_model(288, false, false);
        m.tokenizer = Some(tok);
        let e = m.save_gguf(&path, OutType::F16).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    let m = tiny_model(288, false, false);
    tch::no_grad(|| {
        let v = m.vs.variables()["model.layers.1.mlp.up_proj.weight"].shallow_clone();
        let _ = v.get(3).get(5).fill_(f64::NAN);
    });
    let e = m.save_gguf(&path, OutType::Q8_0).unwrap_err().to_string();
    assert!(
        e.contains("blk.1.ffn_up.weight") && e.contains("NaN"),
        "{e}"
    );
    tch::no_grad(|| {
        let v = m.vs.variables()["model.layers.1.mlp.up_proj.weight"].shallow_clone();
        let _ = v.get(3).get(5).fill_(1e6);
    });
    let e = m.save_gguf(&path, OutType::F16).unwrap_err().to_string();
    assert!(e.contains("f16's range"), "{e}");
    assert!(
        !path.exists() && std::fs::read_dir(dir.path()).unwrap().count() == 0,
        "a refused or failed write leaves nothing behind"
    );
}

#[test]
fn convert_cli_writes_gguf_and_refuses_type_for_folders() {
    let dir = tempfile::tempdir().unwrap();
    let src = tiny_model(288, false, false);
    let hf = dir.path().join("hf");
    src.save_hf(&hf).unwrap();
    let out = dir.path().join("s.gguf");
    let o = distill(&[
        "convert",
        hf.to_str().unwrap(),
        out.to_str().unwrap(),
        "--type",
        "q4_k",
        "--layers",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("q4_k") && stdout.contains("Q4_K"),
        "{stdout}"
    );
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.get("llama.block_count"), Some(&Value::U32(1)));
    assert_eq!(
        g.tensor("blk.0.attn_q.weight").unwrap().ggml_type,
        GgmlType::Q4_K
    );
    let again = distill(&["convert", hf.to_str().unwrap(), out.to_str().unwrap()]);
    assert_clean_failure(&again, &["already exists"]);
    let folder = dir.path().join("folder");
    let o = distill(&[
        "convert",
        hf.to_str().unwrap(),
        folder.to_str().unwrap(),
        "--type",
        "q8_0",
    ]);
    assert_clean_failure(&o, &["--type", ".gguf"]);
    let o = distill(&[
        "convert",
        hf.to_str().unwrap(),
        dir.path().join("x.gguf").to_str().unwrap(),
        "--type",
        "q4_0",
    ]);
    assert_eq!(o.status.code(), Some(2));
}

/// A paragraph with digits, punctuation, newlines, non-ASCII and a special token.
const PARAGRAPH: &str = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate:\nRough winds do shake the darling buds of May, 1609 —\tand summer's lease hath all too short a date. <|im_end|> Ça va? 12345 naïve";

#[test]
fn demo_teacher_to_hf_to_gguf_f16_keeps_logits_tokenizer_and_template() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = demo_teacher();
    let hf = dir.path().join("hf");
    let out = dir.path().join("teacher.f16.gguf");
    for args in [
        vec!["convert", teacher.to_str().unwrap(), hf.to_str().unwrap()],
        vec!["convert", hf.to_str().unwrap(), out.to_str().unwrap()],
    ] {
        let o = distill(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let src = model::load(&hf, Device::Cpu).unwrap();
    let back = model::load(&out, Device::Cpu).unwrap();
    assert_eq!(back.model.config, {
        // what GGUF does not carry: the f32 eps and the eos list beyond its first
        let mut c = src.model.config.clone();
        c.rms_norm_eps = c.rms_norm_eps as f32 as f64;
        c
    });

    // the metadata llama.cpp reads equals that of the llama.cpp-made original, value and type
    let orig = GgufFile::open(&teacher).unwrap();
    let ours = GgufFile::open(&out).unwrap();
    for key in [
        "general.architecture",
        "llama.vocab_size",
        "llama.context_length",
        "llama.embedding_length",
        "llama.block_count",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon",
        "llama.rope.dimension_count",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
    ] {
        assert_eq!(ours.get(key), orig.get(key), "{key}");
    }
    assert_eq!(ours.get("general.file_type"), Some(&Value::U32(1)));

    // the tokenizer: same ids on a paragraph, same template, same rendering
    let (ts, tb) = (
        src.tokenizer.as_ref().unwrap(),
        back.tokenizer.as_ref().unwrap(),
    );
    let ids = ts.encode(PARAGRAPH, true).unwrap();
    assert_eq!(tb.encode(PARAGRAPH, true).unwrap(), ids);
    assert_eq!(tb.chat_template, ts.chat_template);
    let chat = [
        model::Message {
            role: "user".into(),
            content: "What is 2+2?".into(),
        },
        model::Message {
            role: "assistant".into(),
            content: "4".into(),
        },
    ];
    assert_eq!(
        tb.apply_chat_template(&chat, true).unwrap(),
        ts.apply_chat_template(&chat, true).unwrap()
    );

    // logits: f16 rounding of every weight (relative ≤ 2^-11) through 30 layers; a first-order
    // sum over 30 × 7 + 1 projections would allow 0.1 of the product scale — measured far lower,
    // and bounded here at 2e-2 of the largest logit
    let ids: Vec<i64> = ids.iter().take(48).map(|&i| i as i64).collect();
    let (a, b) = (logits(&src, &ids), logits(&back, &ids));
    let rel = max_rel_err(&b, &a);
    eprintln!("demo teacher HF → GGUF f16 → reader: max |Δ| / max |logit| = {rel:.2e}");
    assert!(rel < 2e-2, "{rel}");
    assert!(a.argmax(-1, false).equal(&b.argmax(-1, false)));
}

/// llama.cpp itself (when installed) loads the demo teacher written as f16, q8_0 and q4_k:
/// tokenizes the paragraph as we do, reports the chat template, and computes logits close to our
/// reader's from the same file (as close as on llama.cpp's own Q4_1 original).
#[test]
fn llama_cpp_loads_what_we_write() {
    let lib = llama_cpp_dir();
    let dir = tempfile::tempdir().unwrap();
    let src = model::load(&demo_teacher(), Device::Cpu).unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, PARAGRAPH).unwrap();
    let n = 32;
    // the llama.cpp-made original (Q4_1) first: how far llama.cpp's arithmetic is from ours on a
    // file we did not write
    let runs = [
        None,
        Some(OutType::F16),
        Some(OutType::Q8_0),
        Some(OutType::Q4_K),
    ];
    let mut baseline = 0.0;
    for ty in runs {
        let name = ty.map_or("original", |t| t.name());
        let path = match ty {
            None => demo_teacher(),
            Some(ty) => {
                let p = dir.path().join(format!("{name}.gguf"));
                src.save_gguf(&p, ty).unwrap();
                p
            }
        };
        let bytes = std::fs::metadata(&path).unwrap().len();
        let out = dir.path().join(name);
        gguf_py(&[
            "llama_cpp",
            lib.to_str().unwrap(),
            path.to_str().unwrap(),
            text.to_str().unwrap(),
            &n.to_string(),
            out.to_str().unwrap(),
        ]);
        let info: Json =
            serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
                .unwrap();
        let ours = model::load(&path, Device::Cpu).unwrap();
        let tok = ours.tokenizer.as_ref().unwrap();
        let ids = tok.encode(PARAGRAPH, false).unwrap();
        assert_eq!(info["ids"], serde_json::json!(ids), "{name}");
        assert_eq!(info["chat_template"].as_str(), tok.chat_template.as_deref());
        assert_eq!(info["meta"]["tokenizer.ggml.pre"], "smollm");
        let vocab = info["n_vocab"].as_i64().unwrap();
        let raw = std::fs::read(out.with_extension("f32")).unwrap();
        let theirs = Tensor::from_data_size(&raw, &[1, n, vocab], Kind::Float);
        let ids: Vec<i64> = ids.iter().take(n as usize).map(|&i| i as i64).collect();
        let mine = logits(&ours, &ids);
        let rel = max_rel_err(&theirs, &mine);
        let agree = mine
            .argmax(-1, false)
            .eq_tensor(&theirs.argmax(-1, false))
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        eprintln!(
            "llama.cpp on the {name} file ({:.1} MB, {}): max |Δ| / max |logit| = {rel:.2e}, top-1 agreement {agree:.3}",
            bytes as f64 / 1e6,
            info["desc"]
        );
        // llama.cpp's CPU matmuls round the activations: to f16 against F16 weights (2^-11
        // relative), to 8 bits against quantised weights (Q8_0 blocks of 32 for Q8_0/Q5_0/Q4_1,
        // Q8_K blocks of 256 for Q4_K: 1/254 of the block's largest), and accumulate in another
        // order. A file llama.cpp misread (a wrong type, layout, permutation or offset) gives
        // unrelated logits; so: f16 within a first-order sum of f16 roundings (< 2e-2 of the logit
        // scale), and a quantised file of ours no further from llama.cpp than 3× llama.cpp's own
        // Q4_1 original is (measured above in the same run), with the same top-1 at ≥ 85% of
        // positions.
        match ty {
            None => baseline = rel,
            Some(OutType::F16) => {
                assert!(rel < 2e-2, "{name}: {rel}");
                assert_eq!(agree, 1.0, "{name}");
            }
            Some(_) => {
                assert!(
                    rel < 3.0 * baseline,
                    "{name}: {rel} vs the original's {baseline}"
                );
                assert!(agree >= 0.85, "{name}: top-1 agreement {agree}");
            }
        }
    }
}
