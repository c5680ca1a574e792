//! Width pruning (`distill::prune_width`, `distill prune-width`): importances equal to those
//! transformers' own modules give through hooks; a pruned folder that transformers loads with our
//! logits; keeping every channel gives the teacher exactly; bad widths refused in one line.
mod common;
use common::*;
use distill::model::{self, LlamaConfig, LoadedModel};
use distill::prune_width::{self, top_k, Importance, WidthSpec};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The ids reference.py uses: (7i + 3) mod V, i < 16.
fn ids(v: usize) -> Vec<i64> {
    (0..16).map(|i| (7 * i + 3) % v as i64).collect()
}

fn logits(m: &LoadedModel) -> Tensor {
    let x = Tensor::from_slice(&ids(m.model.config.vocab_size)).unsqueeze(0);
    tch::no_grad(|| m.model.forward(&x).unwrap()).squeeze_dim(0)
}

/// A plain tied Llama (4 heads over 2 kv heads), and an untied one with every bias, set non-zero.
fn teachers() -> Vec<LoadedModel> {
    let plain = LlamaConfig::tiny(64, 32, 2, 4, 2);
    let mut biased = LlamaConfig::tiny(80, 48, 2, 6, 3);
    biased.tie_word_embeddings = false;
    biased.qkv_bias = true;
    biased.o_bias = true;
    biased.mlp_bias = true;
    biased.intermediate_size = 72;
    [plain, biased]
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let m = model::random(c, Device::Cpu, 30 + i as i64).unwrap();
            tch::no_grad(|| {
                for (name, mut v) in m.vs.variables() {
                    if name.ends_with(".bias") {
                        v.copy_(&(Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.5));
                    }
                    // norm weights away from 1, so that a norm sliced wrongly shows
                    if name.ends_with("norm.weight") {
                        v.copy_(&(Tensor::rand(v.size(), (Kind::Float, Device::Cpu)) + 0.5));
                    }
                }
            });
            m
        })
        .collect()
}

fn reference_importance(dir: &Path, layers: usize) -> Importance {
    let out = dir.join("importance.safetensors");
    reference(&[
        "activation_importance",
        dir.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let v =
        |name: &str| Vec::<f64>::try_from(read_tensor(&out, name).to_kind(Kind::Double)).unwrap();
    Importance {
        mlp: (0..layers).map(|l| v(&format!("mlp.{l}"))).collect(),
        heads: (0..layers).map(|l| v(&format!("heads.{l}"))).collect(),
        hidden: v("hidden"),
    }
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Our importances (f32 forward, f64 sums) against transformers' (f64 forward, hooks on its own
/// modules): f32 rounding through two layers is ~1e-6 relative, the reference is stored as f32
/// (6e-8); 1e-4 leaves a wide margin and still catches a wrong norm, head or channel.
#[test]
fn importance_matches_transformers_hooks() {
    for (i, m) in teachers().iter().enumerate() {
        let c = &m.model.config;
        let tmp = tempfile::tempdir().unwrap();
        m.save_hf(tmp.path()).unwrap();
        let theirs = reference_importance(tmp.path(), c.num_hidden_layers);
        let ours = prune_width::importance(&m.model, &[ids(c.vocab_size)]).unwrap();
        for l in 0..c.num_hidden_layers {
            let e = max_rel(&ours.mlp[l], &theirs.mlp[l]);
            assert!(e < 1e-4, "teacher #{i} layer {l} mlp: {e}");
            let e = max_rel(&ours.heads[l], &theirs.heads[l]);
            assert!(e < 1e-4, "teacher #{i} layer {l} heads: {e}");
        }
        let e = max_rel(&ours.hidden, &theirs.hidden);
        assert!(e < 1e-4, "teacher #{i} hidden: {e}");

        // the pruned student holds exactly the teacher's rows at the reference's top channels
        let s = WidthSpec::resolve(c, Some(c.hidden_size - 8), Some(40), None, None).unwrap();
        let p = prune_width::prune(m, &s, &ours).unwrap();
        let (tv, pv) = (m.vs.variables(), p.vs.variables());
        let hid = Tensor::from_slice(&top_k(&theirs.hidden, s.hidden_size));
        let f = Tensor::from_slice(&top_k(&theirs.mlp[1], 40));
        let want = tv["model.layers.1.mlp.gate_proj.weight"]
            .index_select(0, &f)
            .index_select(1, &hid);
        assert!(
            pv["model.layers.1.mlp.gate_proj.weight"].equal(&want),
            "#{i}"
        );
        let want = tv["model.layers.1.mlp.down_proj.weight"]
            .index_select(0, &hid)
            .index_select(1, &f);
        assert!(
            pv["model.layers.1.mlp.down_proj.weight"].equal(&want),
            "#{i}"
        );
        let want = tv["model.embed_tokens.weight"].index_select(1, &hid);
        assert!(pv["model.embed_tokens.weight"].equal(&want), "#{i}");
    }
}

/// Pruned folders (hidden, MLP, whole kv groups, heads within groups) load in transformers with
/// logits equal to ours: both compute the same f32 arithmetic, so ~1e-6 relative; 1e-4 asked.
#[test]
fn pruned_loads_in_transformers_with_equal_logits() {
    for (i, m) in teachers().iter().enumerate() {
        let c = m.model.config.clone();
        let imp = prune_width::importance(&m.model, &[ids(c.vocab_size)]).unwrap();
        let g = c.num_attention_heads / c.num_key_value_heads;
        let specs = [
            // fewer kv groups, group size kept
            (c.hidden_size * 3 / 4, c.intermediate_size / 2, g, 1),
            // every kv head, one query head each
            (
                c.hidden_size / 2,
                24,
                c.num_key_value_heads,
                c.num_key_value_heads,
            ),
        ];
        for (j, &(h, f, nh, kv)) in specs.iter().enumerate() {
            let s = WidthSpec::resolve(&c, Some(h), Some(f), Some(nh), Some(kv)).unwrap();
            let p = prune_width::prune(m, &s, &imp).unwrap();
            let tmp = tempfile::tempdir().unwrap();
            p.save_hf(tmp.path()).unwrap();
            let cfg: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(tmp.path().join("config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(cfg["hidden_size"], h);
            assert_eq!(cfg["intermediate_size"], f);
            assert_eq!(cfg["num_attention_heads"], nh);
            assert_eq!(cfg["num_key_value_heads"], kv);
            assert_eq!(cfg["head_dim"], c.head_dim);
            let out = tmp.path().join("ref.safetensors");
            reference(&[
                "random_model_logits",
                tmp.path().to_str().unwrap(),
                out.to_str().unwrap(),
            ]);
            // ours from the folder as saved, and from the model in memory
            let loaded = model::load(tmp.path(), Device::Cpu).unwrap();
            let ours = logits(&loaded);
            assert!(ours.equal(&logits(&p)), "#{i}.{j}: reload differs");
            let err = max_rel_err(&ours, &read_tensor(&out, "logits"));
            assert!(
                err < 1e-4,
                "teacher #{i} spec #{j}: max relative error {err}"
            );
        }
    }
}

/// Every channel kept (by importance or at random): the teacher's weights in their order, so the
/// teacher's logits bit for bit.
#[test]
fn keeping_everything_is_the_teacher() {
    for m in teachers() {
        let c = &m.model.config;
        let s = WidthSpec::resolve(c, None, None, None, None).unwrap();
        for imp in [
            prune_width::importance(&m.model, &[ids(c.vocab_size)]).unwrap(),
            prune_width::random_importance(c, 5).unwrap(),
        ] {
            let p = prune_width::prune(&m, &s, &imp).unwrap();
            assert!(logits(&p).equal(&logits(&m)));
        }
    }
}

/// The command: a random pruning works and says so; bad widths are refused in one line naming
/// the flag, before anything is written.
#[test]
fn command_prunes_and_refuses_bad_widths() {
    let m = model::random(&LlamaConfig::tiny(64, 32, 2, 4, 2), Device::Cpu, 3).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let teacher = tmp.path().join("teacher");
    m.save_hf(&teacher).unwrap();
    let t = teacher.to_str().unwrap();
    let out = tmp.path().join("student");
    let o = out.to_str().unwrap();
    let run = distill(&[
        "prune-width",
        t,
        "--hidden-size",
        "24",
        "--heads",
        "2",
        "--random",
        "--seed",
        "1",
        "--out",
        o,
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let s = model::load(&out, Device::Cpu).unwrap();
    assert_eq!(
        (
            s.model.config.hidden_size,
            s.model.config.num_attention_heads,
            s.model.config.num_key_value_heads
        ),
        (24, 2, 1)
    );
    let bad_out = tmp.path().join("bad");
    let b = bad_out.to_str().unwrap();
    for (args, needles) in [
        (
            vec!["--hidden-size", "64"],
            vec!["--hidden-size 64", "1..=32"],
        ),
        (
            vec!["--intermediate-size", "0"],
            vec!["--intermediate-size 0"],
        ),
        (
            vec!["--heads", "3", "--kv-heads", "2"],
            vec!["--heads 3", "not a multiple"],
        ),
        (
            vec!["--heads", "4", "--kv-heads", "1"],
            vec!["4 query heads per key/value head", "teacher has 2"],
        ),
        (vec!["--heads", "8"], vec!["--heads 8", "1..=4"]),
    ] {
        let mut a = vec!["prune-width", t, "--random", "--out", b];
        a.extend(args);
        assert_clean_failure(&distill(&a), &needles);
        assert!(!bad_out.exists());
    }
    // a folder already holding a model is not overwritten
    let again = distill(&["prune-width", t, "--random", "--out", o]);
    assert_clean_failure(&again, &["already holds a model"]);
    // calibration text needs the teacher's tokenizer
    let text = tmp.path().join("calib.txt");
    std::fs::write(&text, "some text").unwrap();
    let r = distill(&[
        "prune-width",
        t,
        "--data",
        text.to_str().unwrap(),
        "--out",
        b,
    ]);
    assert_clean_failure(&r, &["no tokenizer"]);
}
