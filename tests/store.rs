//! The teacher store: capture → read round trip against the teacher's own logits, a SIGKILL
//! during capture then resume, each identity mismatch, a damaged shard, append, the hybrid (equal
//! to the live teacher where the store has nothing; write-back), training from a full-coverage
//! store against the live teacher, inspect and verify, and a shard read from Python.
mod common;
use common::*;
use distill::config::RunConfig;
use distill::model::{self, LlamaConfig, Tokenizer};
use distill::teacher::store::select::Quant;
use distill::teacher::Store;
use std::path::Path;
use tch::{Device, Kind, Tensor};

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

fn tiny(dir: &Path, name: &str, seed: i64, scale: f64, specials: &[&str]) {
    let mut cfg = LlamaConfig::tiny(259, 48, 2, 4, 2);
    cfg.eos_token_ids = vec![256];
    let mut m = model::random(&cfg, Device::Cpu, seed).unwrap();
    tch::no_grad(|| {
        let mut e = m.vs.variables()["model.embed_tokens.weight"].shallow_clone();
        let _ = e.f_mul_scalar_(scale).unwrap();
    });
    m.tokenizer = Some(Tokenizer::byte_level(specials).unwrap());
    m.save_hf(&dir.join(name)).unwrap();
}

/// `n` words drawn by a linear congruential generator from `seed` (no two sequences alike).
fn words(n: usize, seed: u64) -> String {
    let w = [
        "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far",
    ];
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            format!("{} ", w[(x >> 33) as usize % w.len()])
        })
        .collect()
}

/// Models (teacher, student, another teacher), two texts, and run files.
fn env() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tiny(d, "teacher", 7, 120.0, SPECIALS);
    tiny(d, "student", 8, 1.0, SPECIALS);
    tiny(d, "other_teacher", 9, 120.0, SPECIALS);
    tiny(
        d,
        "other_tokenizer",
        8,
        1.0,
        &["<|endoftext|>", "<|a|>", "<|b|>"],
    );
    std::fs::write(d.join("a.txt"), words(600, 1)).unwrap();
    std::fs::write(d.join("b.txt"), words(300, 2)).unwrap();
    dir
}

fn run_file(dir: &Path, name: &str, teacher: &str, extra: &str) {
    let text = format!(
        r#"
[teacher]
{teacher}

[student]
path = "student"

[data]
train = "a.txt"
seq_len = 32
validation_fraction = 0.1
max_validation_sequences = 3

[[loss]]
kind = "forward_kl"

[optim]
lr = 3e-3
micro_batch = 2

[run]
steps = 3
eval_every = 0
checkpoint_every = 0
seed = 5
output = "out-{name}"
threads = 1

[capture]
coverage = 0.9
max_k = 16
shard_sequences = 5
tail_samples = 0
{extra}
"#
    );
    std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn p(dir: &Path, x: &str) -> String {
    dir.join(x).display().to_string()
}

/// Every record of a store by key: (tokens, at, ids, logprobs, tail, log_z), for comparisons.
#[cfg(feature = "fault-injection")]
type Rec = (Vec<u32>, Vec<u32>, Vec<u32>, Vec<f32>, Vec<f32>, Vec<f32>);
#[cfg(feature = "fault-injection")]
fn records(dir: &Path) -> std::collections::BTreeMap<u64, Rec> {
    let store = Store::open(dir).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for s in 0..store.header.shards.len() {
        let sh = store.shard(s).unwrap();
        for row in 0..sh.len() {
            let pos = sh.positions(row);
            let e = sh.entry_at[pos.start]..sh.entry_at[pos.end];
            let prev = out.insert(
                sh.keys[row],
                (
                    sh.tokens_of(row).to_vec(),
                    sh.at[pos.clone()].to_vec(),
                    sh.ids[e.clone()].to_vec(),
                    sh.logprobs[e].to_vec(),
                    sh.log_tail[pos.clone()].to_vec(),
                    sh.log_z[pos].to_vec(),
                ),
            );
            assert!(prev.is_none(), "key {:x} stored twice", sh.keys[row]);
        }
    }
    out
}

#[test]
fn capture_round_trip_matches_the_teachers_distribution() {
    let env = env();
    let d = env.path();
    for (q, quant) in [("u8", Quant::U8), ("f16", Quant::F16)] {
        let name = format!("rt-{q}");
        run_file(
            d,
            &name,
            &format!("path = \"teacher\"\nstore = \"store-{q}\""),
            &format!("quantisation = \"{q}\""),
        );
        let out = ok(&distill(&["capture", &p(d, &format!("{name}.toml"))]));
        assert!(out.contains("captured"), "{out}");
        let cfg = RunConfig::load(&d.join(format!("{name}.toml")), &[]).unwrap();
        let teacher = model::load(&d.join("teacher"), Device::Cpu).unwrap();
        let tok = teacher.tokenizer.as_ref().unwrap();
        let ds = distill::data::load(&cfg.data, tok, model::eos_id(&teacher)).unwrap();
        let store = Store::open(&d.join(format!("store-{q}"))).unwrap();
        assert!(store.header.shards.len() > 1, "several shards");
        let sel = store.header.selection;
        assert_eq!(sel.quantisation, quant);
        let mut positions = 0;
        for seq in ds.validation.iter().chain(&ds.train) {
            let rec = store
                .get(seq.key())
                .unwrap()
                .expect("every sequence captured");
            let sh = &rec.shard;
            assert_eq!(sh.tokens_of(rec.row), &seq.ids[..]);
            // the reference: the teacher's logits, in f64
            let ids: Vec<i64> = seq.ids.iter().map(|&x| x as i64).collect();
            let x = Tensor::from_slice(&ids).view([1, -1]);
            let logits = tch::no_grad(|| teacher.model.forward(&x).unwrap())
                .squeeze_dim(0)
                .to_kind(Kind::Double);
            let lp = logits.log_softmax(-1, Kind::Double);
            let lz = logits.logsumexp(&[-1i64][..], false);
            let targets: Vec<usize> = (0..seq.labels.len())
                .filter(|&t| seq.labels[t] != -100)
                .collect();
            let range = sh.positions(rec.row);
            assert_eq!(range.len(), targets.len());
            for (p, &t) in range.zip(&targets) {
                assert_eq!(sh.at[p] as usize, t);
                let row: Vec<f64> = Vec::<f64>::try_from(lp.get(t as i64)).unwrap();
                let mut order: Vec<usize> = (0..row.len()).collect();
                order.sort_by(|a, b| row[*b].total_cmp(&row[*a]));
                let e = sh.entries(p);
                let kept: Vec<usize> = sh.ids[e.clone()].iter().map(|&i| i as usize).collect();
                let stored = &sh.logprobs[e];
                let label = seq.labels[t] as usize;
                assert!(kept.contains(&label), "label kept");
                assert!(kept.len() <= sel.max_k);
                // the non-label part is a most-probable prefix (to f32 rounding of near-ties)
                let top: Vec<usize> = kept
                    .iter()
                    .copied()
                    .filter(|&i| i != label || order[..kept.len()].contains(&label))
                    .collect();
                let m = top.len();
                let mth = row[order[m - 1]];
                for &i in &top {
                    assert!(
                        row[i] >= mth - 1e-5,
                        "kept token {i} is not among the top {m}"
                    );
                }
                // the smallest prefix reaching the coverage, unless capped
                let mass = |n: usize| -> f64 { order[..n].iter().map(|&i| row[i].exp()).sum() };
                let capped = kept.len() == sel.max_k;
                if !capped {
                    assert!(
                        mass(m) >= sel.coverage - 1e-5,
                        "prefix reaches the coverage"
                    );
                }
                if m > 1 {
                    assert!(
                        mass(m - 1) < sel.coverage + 1e-5,
                        "no shorter prefix reaches it"
                    );
                }
                // values: quantised log p; tail = 1 − Σ kept p; log Z
                let step = match quant {
                    Quant::U8 => 20.0 / 255.0 / 2.0,
                    Quant::F16 => 0.0,
                };
                let mut kept_mass = 0.0;
                for (&i, &s) in kept.iter().zip(stored) {
                    let r = row[i];
                    kept_mass += r.exp();
                    let tol = step + r.abs() * 2f64.powi(-11) + 1e-5;
                    if r > -20.0 {
                        assert!((s as f64 - r).abs() <= tol, "log p {s} vs {r}");
                    }
                }
                // log tail = log Σ_{v not kept} p(v), however small
                let off: Vec<f64> = (0..row.len())
                    .filter(|i| !kept.contains(i))
                    .map(|i| row[i])
                    .collect();
                let m = off.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lt = m + off.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                assert!(
                    (sh.log_tail[p] as f64 - lt).abs() <= 1e-4 * lt.abs().max(1.0),
                    "log tail {} vs {lt}",
                    sh.log_tail[p]
                );
                let _ = kept_mass;
                let z = lz.double_value(&[t as i64]);
                assert!((sh.log_z[p] as f64 - z).abs() <= 1e-5 * z.abs().max(1.0));
                positions += 1;
            }
        }
        assert_eq!(positions, store.header.positions());
    }
}

#[test]
fn a_shard_opens_in_python() {
    let env = env();
    let d = env.path();
    run_file(d, "py", "path = \"teacher\"\nstore = \"store\"", "");
    ok(&distill(&["capture", &p(d, "py.toml")]));
    let store = Store::open(&d.join("store")).unwrap();
    let sh = store.shard(0).unwrap();
    let script = r#"
import sys, json, zstandard, safetensors.numpy as sn
t = sn.load(zstandard.ZstdDecompressor().decompress(open(sys.argv[1], "rb").read()))
print(json.dumps({k: [str(v.dtype), int(v.shape[0]), float(v.astype("float64").sum())] for k, v in t.items()}))
"#;
    let out = std::process::Command::new(python())
        .args(["-c", script, &p(d, "store/shard-00000.safetensors.zst")])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(v["ids"][1], sh.ids.len());
    assert_eq!(
        v["ids"][2].as_f64().unwrap(),
        sh.ids.iter().map(|&x| x as f64).sum::<f64>()
    );
    assert_eq!(v["k"][1], sh.log_tail.len());
    assert_eq!(v["keys"][1], sh.len());
    assert_eq!(v["logprobs"][0], "uint8");
    let lp: f64 = sh.logprobs.iter().map(|&x| x as f64).sum();
    let q = v["logprobs"][2].as_f64().unwrap(); // Σ q, log p = −q · 20/255
    assert!((lp + q * 20.0 / 255.0).abs() < 1e-6 * lp.abs() + 1e-3);
}

#[cfg(feature = "fault-injection")]
#[test]
fn a_capture_killed_between_shard_and_header_resumes_without_repeats_or_gaps() {
    let env = env();
    let d = env.path();
    // with tail draws: a sequence's draws are seeded by its key, so the resumed capture (other
    // batches) stores it alike
    for name in ["whole", "killed"] {
        run_file(
            d,
            name,
            &format!("path = \"teacher\"\nstore = \"{name}\""),
            "",
        );
        let text = std::fs::read_to_string(d.join(format!("{name}.toml"))).unwrap();
        std::fs::write(
            d.join(format!("{name}.toml")),
            text.replace("tail_samples = 0", "tail_samples = 8"),
        )
        .unwrap();
    }
    ok(&distill(&["capture", &p(d, "whole.toml")]));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["capture", &p(d, "killed.toml")])
        .env("DISTILL_FAULT_CAPTURE_DIE_AFTER_SHARD", "2")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(9), "killed by SIGKILL");
    // the header lists the two complete shards; the third file is an orphan
    let h = Store::open(&d.join("killed")).unwrap().header;
    assert_eq!(h.shards.len(), 2);
    assert!(d.join("killed/shard-00002.safetensors.zst").exists());
    let again = ok(&distill(&["capture", &p(d, "killed.toml")]));
    assert!(again.contains("10 were already in the store"), "{again}");
    assert_eq!(records(&d.join("killed")), records(&d.join("whole")));
    // a third run has nothing to do
    let third = ok(&distill(&["capture", &p(d, "killed.toml")]));
    assert!(third.contains("captured 0 sequences"), "{third}");
}

#[test]
fn a_store_that_belongs_elsewhere_is_refused_by_name() {
    let env = env();
    let d = env.path();
    run_file(d, "cap", "path = \"teacher\"\nstore = \"store\"", "");
    ok(&distill(&["capture", &p(d, "cap.toml")]));
    // teacher: a hybrid run with another teacher model
    run_file(d, "t", "path = \"other_teacher\"\nstore = \"store\"", "");
    assert_clean_failure(
        &distill(&["train", &p(d, "t.toml")]),
        &["store.json", "teacher (store"],
    );
    // tokenizer: a store-only run whose student reads the data with another tokenizer
    run_file(d, "tok", "store = \"store\"", "");
    let text = std::fs::read_to_string(d.join("tok.toml")).unwrap();
    std::fs::write(
        d.join("tok.toml"),
        text.replace("path = \"student\"", "path = \"other_tokenizer\""),
    )
    .unwrap();
    assert_clean_failure(
        &distill(&["train", &p(d, "tok.toml")]),
        &["tokenizer (store"],
    );
    // chat template: the same tokenizer with a template added
    let templ = d.join("student_templ");
    std::fs::create_dir_all(&templ).unwrap();
    for f in std::fs::read_dir(d.join("student")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, templ.join(f.file_name().unwrap())).unwrap();
    }
    let tc = templ.join("tokenizer_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
    v["chat_template"] = serde_json::json!("{% for m in messages %}{{ m['content'] }}{% endfor %}");
    std::fs::write(&tc, v.to_string()).unwrap();
    std::fs::write(
        d.join("templ.toml"),
        text.replace("path = \"student\"", "path = \"student_templ\""),
    )
    .unwrap();
    assert_clean_failure(
        &distill(&["train", &p(d, "templ.toml")]),
        &["chat_template (store"],
    );
    // seq_len
    run_file(d, "sl", "store = \"store\"", "");
    assert_clean_failure(
        &distill(&["train", &p(d, "sl.toml"), "--set", "data.seq_len=16"]),
        &["seq_len (store 32, this run 16)"],
    );
    // packing: the text as one sequence per document instead of packed (its own validation file:
    // one document holds out nothing)
    run_file(d, "pk", "store = \"store\"", "");
    assert_clean_failure(
        &distill(&[
            "train",
            &p(d, "pk.toml"),
            "--set",
            "data.packing=false",
            "--set",
            "data.validation=\"b.txt\"",
        ]),
        &["packing (store true, this run false)"],
    );
    // data: other text, no teacher model to fill in
    run_file(d, "data", "store = \"store\"", "");
    let text = std::fs::read_to_string(d.join("data.toml")).unwrap();
    std::fs::write(d.join("data.toml"), text.replace("a.txt", "b.txt")).unwrap();
    assert_clean_failure(
        &distill(&["train", &p(d, "data.toml")]),
        &[
            "data: ",
            "sequences this run reads are not in the store",
            "--append",
        ],
    );
    // nothing was written by the refused runs
    for n in ["t", "tok", "templ", "sl", "pk", "data"] {
        assert!(!d.join(format!("out-{n}")).exists(), "{n}");
    }
}

/// The vocabulary line the library gives for the run's teacher and student folders.
fn vocab_summary(d: &Path, student: &str) -> String {
    let t = model::load(&d.join("teacher"), Device::Cpu).unwrap();
    let s = model::load(&d.join(student), Device::Cpu).unwrap();
    distill::teacher::vocab::check(&t, &s).unwrap().0.summary()
}

#[test]
fn a_capture_runs_the_vocabulary_check_first() {
    let env = env();
    let d = env.path();
    // a student with tokens the teacher lacks: refused before the store is made
    run_file(d, "tok", "path = \"teacher\"\nstore = \"store-tok\"", "");
    let text = std::fs::read_to_string(d.join("tok.toml")).unwrap();
    std::fs::write(
        d.join("tok.toml"),
        text.replace("path = \"student\"", "path = \"other_tokenizer\""),
    )
    .unwrap();
    assert_clean_failure(
        &distill(&["capture", &p(d, "tok.toml")]),
        &[
            "differs from the teacher's",
            "only in the teacher's",
            "cross-tokenizer distillation is not supported",
        ],
    );
    assert!(!d.join("store-tok").exists(), "nothing written");
    // a student with 5 padding rows beyond the tokenizer: captured, the line printed
    let mut cfg = LlamaConfig::tiny(264, 48, 2, 4, 2);
    cfg.eos_token_ids = vec![256];
    let mut m = model::random(&cfg, Device::Cpu, 8).unwrap();
    m.tokenizer = Some(Tokenizer::byte_level(SPECIALS).unwrap());
    m.save_hf(&d.join("padded")).unwrap();
    std::fs::write(
        d.join("padded.toml"),
        text.replace("path = \"student\"", "path = \"padded\"")
            .replace("store-tok", "store-padded"),
    )
    .unwrap();
    let out = distill(&["capture", &p(d, "padded.toml")]);
    ok(&out);
    let expected = vocab_summary(d, "padded");
    assert!(expected.contains("student 264 (5 padding)"), "{expected}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().any(|l| l == expected),
        "{expected}\nnot in\n{stderr}"
    );
}

#[test]
fn a_damaged_shard_is_refused_naming_the_file() {
    let env = env();
    let d = env.path();
    run_file(d, "cap", "path = \"teacher\"\nstore = \"store\"", "");
    ok(&distill(&["capture", &p(d, "cap.toml")]));
    run_file(d, "from", "store = \"store\"", "");
    let shard = d.join("store/shard-00001.safetensors.zst");
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();
    assert_clean_failure(
        &distill(&["store", "inspect", &p(d, "store")]),
        &["shard-00001.safetensors.zst", "damaged shard"],
    );
    // truncated: the same error from a run, when it first reads the shard (after its set-up line)
    std::fs::write(&shard, &bytes[..mid]).unwrap();
    let out = distill(&["train", &p(d, "from.toml"), "--set", "run.steps=200"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("distill: ")
            && last.contains("shard-00001.safetensors.zst")
            && last.contains("damaged shard")
            && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// The student's weights and the train records' losses of a finished run.
fn result(d: &Path, name: &str) -> (Vec<u8>, Vec<f64>) {
    let out = d.join(format!("out-{name}"));
    let w = std::fs::read(out.join("student/model.safetensors")).unwrap();
    let losses = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "train")
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    (w, losses)
}

#[test]
fn a_hybrid_equals_the_live_teacher_where_the_store_has_nothing() {
    let env = env();
    let d = env.path();
    // a store of the other text only
    run_file(d, "cap", "path = \"teacher\"\nstore = \"store\"", "");
    let text = std::fs::read_to_string(d.join("cap.toml")).unwrap();
    std::fs::write(d.join("cap.toml"), text.replace("a.txt", "b.txt")).unwrap();
    ok(&distill(&["capture", &p(d, "cap.toml")]));
    run_file(d, "live", "path = \"teacher\"", "");
    run_file(d, "hybrid", "path = \"teacher\"\nstore = \"store\"", "");
    ok(&distill(&["train", &p(d, "live.toml")]));
    ok(&distill(&["train", &p(d, "hybrid.toml")]));
    let (wl, ll) = result(d, "live");
    let (wh, lh) = result(d, "hybrid");
    assert_eq!(ll, lh, "losses step for step");
    assert!(wl == wh, "the same student, bit for bit");
    let m = std::fs::read_to_string(d.join("out-hybrid/metrics.jsonl")).unwrap();
    assert!(
        m.contains("\"store_fraction\":0.0"),
        "the store served nothing: {m}"
    );
}

#[test]
fn append_and_write_back_grow_the_store() {
    let env = env();
    let d = env.path();
    run_file(d, "a", "path = \"teacher\"\nstore = \"store\"", "");
    ok(&distill(&["capture", &p(d, "a.toml"), "--steps", "1"]));
    let before = Store::open(&d.join("store")).unwrap().len();
    assert_eq!(before, 3 + 2, "validation and one step's micro-batch");
    // other data without --append is refused, with it added
    run_file(d, "b", "path = \"teacher\"\nstore = \"store\"", "");
    let text = std::fs::read_to_string(d.join("b.toml")).unwrap();
    std::fs::write(d.join("b.toml"), text.replace("a.txt", "b.txt")).unwrap();
    assert_clean_failure(
        &distill(&["capture", &p(d, "b.toml")]),
        &["data: ", "--append"],
    );
    let out = ok(&distill(&["capture", &p(d, "b.toml"), "--append"]));
    assert!(out.contains("captured"), "{out}");
    let with_b = Store::open(&d.join("store")).unwrap();
    assert!(with_b.len() > before);
    assert_eq!(with_b.header.captures.len(), 2);
    // a store-only run on b's data reads only stored sequences
    run_file(d, "onb", "store = \"store\"", "");
    let text = std::fs::read_to_string(d.join("onb.toml")).unwrap();
    std::fs::write(d.join("onb.toml"), text.replace("a.txt", "b.txt")).unwrap();
    ok(&distill(&["train", &p(d, "onb.toml")]));
    // a hybrid run of 3 steps on a's data: step 1's rows from the store, the rest live, written back
    run_file(
        d,
        "wb",
        "path = \"teacher\"\nstore = \"store\"\nwrite_back = true",
        "",
    );
    ok(&distill(&["train", &p(d, "wb.toml")]));
    let m = std::fs::read_to_string(d.join("out-wb/metrics.jsonl")).unwrap();
    let fr: Vec<f64> = m
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|r| r["store_fraction"].as_f64())
        .collect();
    assert_eq!(fr.len(), 3);
    assert!(fr[2] < 1.0 && fr[2] > 0.0, "{fr:?}");
    let after = Store::open(&d.join("store")).unwrap().len();
    assert!(
        after >= with_b.len() + 2,
        "steps 2 and 3's rows written back"
    );
    // now a store-only run of those 3 steps has every sequence it reads
    run_file(d, "only", "store = \"store\"", "");
    ok(&distill(&["train", &p(d, "only.toml")]));
}

#[test]
fn a_full_coverage_store_trains_like_the_live_teacher() {
    let env = env();
    let d = env.path();
    // every token kept, f16 log-probabilities: the reduced distribution is the full one
    run_file(
        d,
        "full",
        "path = \"teacher\"\nstore = \"store\"",
        "quantisation = \"f16\"\n",
    );
    let text = std::fs::read_to_string(d.join("full.toml")).unwrap();
    std::fs::write(
        d.join("full.toml"),
        text.replace("coverage = 0.9", "coverage = 1.0")
            .replace("max_k = 16", "max_k = 259"),
    )
    .unwrap();
    ok(&distill(&["capture", &p(d, "full.toml")]));
    run_file(d, "live", "path = \"teacher\"", "");
    run_file(d, "stored", "store = \"store\"", "");
    ok(&distill(&["train", &p(d, "live.toml")]));
    ok(&distill(&["train", &p(d, "stored.toml")]));
    let (_, ll) = result(d, "live");
    let (_, ls) = result(d, "stored");

    // |Δ KL| ≤ Σ p |δ log p| + |δ log Σ p| ≤ 2 max |δ|, with |δ| ≤ |log p| · 2⁻¹¹ (f16), and the
    // student's own f32 rounding; the stored log p lie above −30 here
    let store = Store::open(&d.join("store")).unwrap();
    let sh = store.shard(0).unwrap();
    let max_lp = sh
        .logprobs
        .iter()
        .fold(0f64, |m, &x| m.max((x as f64).abs()));
    let bound = 2.0 * max_lp * 2f64.powi(-11) + 1e-4;
    assert!(
        (ll[0] - ls[0]).abs() <= bound,
        "step 1: live {} store {} (bound {bound})",
        ll[0],
        ls[0]
    );
    let m = std::fs::read_to_string(d.join("out-stored/run.json")).unwrap();
    assert!(m.contains("\"format\": \"store\""), "{m}");
}

#[test]
fn inspect_and_verify_describe_the_store() {
    let env = env();
    let d = env.path();
    run_file(
        d,
        "cap",
        "path = \"teacher\"\nstore = \"store\"",
        "quantisation = \"f16\"",
    );
    ok(&distill(&["capture", &p(d, "cap.toml")]));
    let i: serde_json::Value = serde_json::from_str(&ok(&distill(&[
        "store",
        "inspect",
        &p(d, "store"),
        "--json",
    ])))
    .unwrap();
    let store = Store::open(&d.join("store")).unwrap();
    let h = &store.header;
    assert_eq!(i["positions"], h.positions());
    assert_eq!(i["bytes"], h.bytes());
    let bpt = i["bytes_per_token"].as_f64().unwrap();
    assert!((bpt - h.bytes() as f64 / h.positions() as f64).abs() < 1e-9);
    assert!(
        (i["mean_k"].as_f64().unwrap() - h.entries() as f64 / h.positions() as f64).abs() < 1e-9
    );
    // the identity and fingerprints, as store.json has them
    assert_eq!(i["identity"]["teacher"], h.identity.teacher.as_str());
    assert_eq!(i["identity"]["tokenizer"], h.identity.tokenizer.as_str());
    assert_eq!(
        i["identity"]["chat_template"],
        h.identity.chat_template.as_str()
    );
    assert_eq!(i["identity"]["seq_len"], 32);
    assert_eq!(
        i["captures"][0]["fingerprint"],
        h.captures[0].fingerprint.as_str()
    );
    assert_eq!(i["selection"]["quantisation"], "f16");
    assert_eq!(i["shard_files"].as_array().unwrap().len(), h.shards.len());
    assert_eq!(
        i["shard_files"][1]["checksum"],
        h.shards[1].checksum.as_str()
    );
    // by number: the n-th sequence in the header's order is the record of the n-th key
    let keys: Vec<u64> = store.keys().collect();
    assert_eq!(keys.len(), h.sequences());
    for (n, &k) in keys.iter().enumerate() {
        let a = store.get_index(n).unwrap().unwrap();
        let b = store.get(k).unwrap().unwrap();
        assert_eq!((a.shard.keys[a.row], a.row), (k, b.row));
        assert_eq!(a.shard.tokens_of(a.row), b.shard.tokens_of(b.row));
    }
    assert!(store.get_index(keys.len()).unwrap().is_none());
    let v: serde_json::Value = serde_json::from_str(&ok(&distill(&[
        "store",
        "verify",
        &p(d, "store"),
        "--positions",
        "100000",
        "--json",
    ])))
    .unwrap();
    assert_eq!(v["teacher_matches"], true);
    assert_eq!(v["positions"], h.positions(), "every position verified");
    // the recomputed mass of the kept tokens equals what the store says it kept (1 − tail)
    let mass = v["captured_mass"].as_f64().unwrap();
    assert!(
        (mass - i["mean_mass"].as_f64().unwrap()).abs() < 1e-4,
        "{v} {i}"
    );
    // f16: KL between the exact and stored reduced distributions is second order in δ ≤ 2⁻¹¹·30
    assert!(v["kl_reduced"].as_f64().unwrap() < 1e-4, "{v}");
    assert!(v["max_abs_logprob_error"].as_f64().unwrap() < 30.0 * 2f64.powi(-11) + 1e-5);
    // another teacher is named as such
    let out = ok(&distill(&[
        "store",
        "verify",
        &p(d, "store"),
        "--teacher",
        &p(d, "other_teacher"),
        "--positions",
        "10",
    ]));
    assert!(
        out.contains("is not the teacher the store was captured from"),
        "{out}"
    );
}

/// The last train step logged in `metrics` (0 when none yet).
#[cfg(feature = "fault-injection")]
fn last_step(metrics: &Path) -> u64 {
    std::fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "train")
        .filter_map(|r| r["step"].as_u64())
        .max()
        .unwrap_or(0)
}

#[cfg(feature = "fault-injection")]
#[test]
fn a_killed_hybrid_run_with_write_back_resumes_exactly() {
    let env = env();
    let d = env.path();
    run_file(d, "cap", "path = \"teacher\"\nstore = \"store-a\"", "");
    // a store with tail draws: rows written back are drawn alike before and after the kill
    let text = std::fs::read_to_string(d.join("cap.toml")).unwrap();
    std::fs::write(
        d.join("cap.toml"),
        text.replace("tail_samples = 0", "tail_samples = 8"),
    )
    .unwrap();
    ok(&distill(&["capture", &p(d, "cap.toml"), "--steps", "2"]));
    // a second copy of the same store for the killed run (write-back changes a store)
    std::fs::create_dir_all(d.join("store-b")).unwrap();
    for f in std::fs::read_dir(d.join("store-a")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, d.join("store-b").join(f.file_name().unwrap())).unwrap();
    }
    for (name, store) in [("whole", "store-a"), ("killed", "store-b")] {
        run_file(
            d,
            name,
            &format!("path = \"teacher\"\nstore = \"{store}\"\nwrite_back = true"),
            "",
        );
        let text = std::fs::read_to_string(d.join(format!("{name}.toml"))).unwrap();
        let text = text
            .replace("steps = 3", "steps = 8")
            .replace("checkpoint_every = 0", "checkpoint_every = 1")
            .replace("shard_sequences = 5", "shard_sequences = 2");
        std::fs::write(d.join(format!("{name}.toml")), text).unwrap();
    }
    let before = Store::open(&d.join("store-a")).unwrap().len();
    ok(&distill(&["train", &p(d, "whole.toml")]));
    assert!(
        Store::open(&d.join("store-a")).unwrap().len() > before,
        "rows written back"
    );
    let metrics = d.join("out-killed/metrics.jsonl");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["train", &p(d, "killed.toml")])
        .env("DISTILL_FAULT_STEP_DELAY_MS", "400")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while last_step(&metrics) < 4 && t.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let reached = last_step(&metrics);
    assert!((4..8).contains(&reached), "killed at step {reached}");
    ok(&distill(&["train", &p(d, "killed.toml"), "--resume"]));
    let (wa, la) = result(d, "whole");
    let (wb, lb) = result(d, "killed");
    assert!(wa == wb, "killed at step {reached}: weights differ");
    // step by step (the killed run logs the steps after its last checkpoint twice: the last wins)
    let loss = |name: &str, step: u64| -> f64 {
        std::fs::read_to_string(d.join(format!("out-{name}/metrics.jsonl")))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .rfind(|r| r["kind"] == "train" && r["step"] == step)
            .unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    for step in 1..=8 {
        assert_eq!(loss("whole", step), loss("killed", step), "step {step}");
    }
    assert_eq!(la.len(), 8);
    assert!(lb.len() >= 8);
    // the two stores ended alike: the same sequences, the same records
    assert_eq!(records(&d.join("store-a")), records(&d.join("store-b")));
}

#[test]
fn sampled_tail_estimates_are_unbiased_and_seeded() {
    use distill::teacher::store::select::{select, Selection, CLOSED_TAIL};
    // one position over 64 tokens: a head of 4 tokens, then a long tail
    let v = 64usize;
    let logits: Vec<f32> = (0..v)
        .map(|i| {
            if i < 4 {
                6.0 - i as f32
            } else {
                -(i as f32) * 0.05
            }
        })
        .collect();
    let x = Tensor::from_slice(&logits).view([1, v as i64]);
    let sel = Selection {
        coverage: 0.5,
        max_k: 4,
        temperature: 1.0,
        quantisation: Quant::F16,
        tail_samples: 16,
    };
    let p: Vec<f64> = {
        let m = logits.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let z: f64 = logits.iter().map(|&l| (l as f64 - m).exp()).sum();
        logits.iter().map(|&l| (l as f64 - m).exp() / z).collect()
    };
    let label = 1i64;
    let seeds = 400u64;
    let mut mean = vec![0.0f64; v];
    for seed in 0..seeds {
        let k = select(&x, &[label], &sel, seed).unwrap().remove(0);
        assert_eq!(k.log_tail, CLOSED_TAIL, "a sampled tail closes the bucket");
        let again = select(&x, &[label], &sel, seed).unwrap().remove(0);
        assert_eq!(k, again, "the same seed draws the same tokens");
        // the head is exact, the label kept, no drawn token repeats a kept one
        let mut ids = k.ids.clone();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), k.ids.len());
        assert!(k.ids.contains(&(label as u32)));
        for (&i, &l) in k.ids.iter().zip(&k.logprobs) {
            mean[i as usize] += (l as f64).exp() / seeds as f64;
        }
    }
    // E[p̂(v)] = p(v): the mean of `seeds` estimates lies within 5 standard deviations, the
    // deviation of m·c/n with c ~ Binomial(n, p/m) being m·sqrt((p/m)(1 − p/m)/n) per seed
    let head_mass: f64 = p[..2].iter().sum(); // coverage 0.5 is reached by the top 2
    let m = 1.0 - head_mass;
    for i in 0..v {
        let sd = if i < 2 {
            0.0
        } else {
            let r = p[i] / m;
            m * (r * (1.0 - r) / 16.0).sqrt() / (seeds as f64).sqrt()
        };
        // f16 rounding of each log p adds at most 2⁻¹¹ relative
        let tol = 5.0 * sd + p[i] * 2f64.powi(-10) + 1e-12;
        assert!(
            (mean[i] - p[i]).abs() <= tol,
            "token {i}: mean estimate {} vs p {} (tol {tol})",
            mean[i],
            p[i]
        );
    }
}

/// KL(full ‖ reconstructed) of a store with tail draws, written plainly in f64 from the teacher's
/// logits and the stored entries: the head chosen again from the exact distribution, the entries
/// after it the draws (each at its stored estimate), Good–Turing's unseen mass m·max(N₁, 1)/n spread evenly
/// over the tokens not stored, normalised; a position without draws spreads its stored tail.
#[test]
fn verify_reconstructs_a_sampled_store_with_the_unseen_mass() {
    let env = env();
    let d = env.path();
    run_file(
        d,
        "cap",
        "path = \"teacher\"\nstore = \"store\"",
        "quantisation = \"f16\"",
    );
    let text = std::fs::read_to_string(d.join("cap.toml")).unwrap();
    std::fs::write(
        d.join("cap.toml"),
        text.replace("tail_samples = 0", "tail_samples = 8"),
    )
    .unwrap();
    ok(&distill(&["capture", &p(d, "cap.toml")]));
    let v: serde_json::Value = serde_json::from_str(&ok(&distill(&[
        "store",
        "verify",
        &p(d, "store"),
        "--positions",
        "100000",
        "--json",
    ])))
    .unwrap();
    let store = Store::open(&d.join("store")).unwrap();
    let sel = store.header.selection;
    assert_eq!((sel.tail_samples, sel.temperature), (8, 1.0));
    let n = sel.tail_samples as f64;
    let teacher = model::load(&d.join("teacher"), Device::Cpu).unwrap();
    let (mut kl_sum, mut positions, mut sampled, mut unseen) = (0.0f64, 0usize, 0usize, 0usize);
    for s in 0..store.header.shards.len() {
        let sh = store.shard(s).unwrap();
        for row in 0..sh.len() {
            let tokens: Vec<i64> = sh.tokens_of(row).iter().map(|&x| x as i64).collect();
            let x = Tensor::from_slice(&tokens).view([1, -1]);
            let logits = tch::no_grad(|| teacher.model.forward(&x).unwrap())
                .squeeze_dim(0)
                .to_kind(Kind::Double);
            for p in sh.positions(row) {
                let t = sh.at[p] as usize;
                let z: Vec<f64> = Vec::<f64>::try_from(logits.get(t as i64)).unwrap();
                let mx = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = mx + z.iter().map(|a| (a - mx).exp()).sum::<f64>().ln();
                let lp: Vec<f64> = z.iter().map(|a| a - lse).collect();
                let e = sh.entries(p);
                let kept: Vec<usize> = sh.ids[e.clone()].iter().map(|&i| i as usize).collect();
                let stored: Vec<f64> = sh.logprobs[e].iter().map(|&x| x as f64).collect();
                let tail = if sh.log_tail[p] == distill::teacher::store::select::CLOSED_TAIL {
                    sampled += 1;
                    // the head: the most probable tokens until their mass reaches the coverage
                    // (at most max_k), the label last in place of the k-th when not among them
                    let mut order: Vec<usize> = (0..lp.len()).collect();
                    order.sort_by(|a, b| lp[*b].total_cmp(&lp[*a]));
                    let (mut head, mut mass) = (Vec::new(), 0.0);
                    while head.len() < sel.max_k && mass < sel.coverage {
                        mass += lp[order[head.len()]].exp();
                        head.push(order[head.len()]);
                    }
                    let label = tokens[t + 1] as usize;
                    if !head.contains(&label) {
                        if head.len() == sel.max_k {
                            head.pop();
                        }
                        head.push(label);
                    }
                    assert_eq!(&kept[..head.len()], &head[..], "the stored head");
                    let drawn: Vec<f64> = stored[head.len()..].iter().map(|l| l.exp()).collect();
                    let m: f64 = drawn.iter().sum();
                    let once = drawn
                        .iter()
                        .filter(|&&q| (q * n / m).round() == 1.0)
                        .count();
                    unseen += usize::from(once > 0);
                    m * once.max(1) as f64 / n
                } else {
                    (sh.log_tail[p] as f64).exp()
                };
                let rest = (lp.len() - kept.len()) as f64;
                let mut r = vec![tail / rest; lp.len()];
                for (&i, &l) in kept.iter().zip(&stored) {
                    r[i] = l.exp();
                }
                let total: f64 = r.iter().sum();
                kl_sum += lp
                    .iter()
                    .zip(&r)
                    .map(|(l, q)| l.exp() * (l - (q / total).ln()))
                    .sum::<f64>();
                positions += 1;
            }
        }
    }
    assert!(
        sampled > 0 && unseen > 0,
        "{sampled} sampled positions, {unseen} with a token drawn once"
    );
    assert_eq!(v["positions"], positions);
    let expected = kl_sum / positions as f64;
    let got = v["kl_reconstructed"].as_f64().unwrap();
    // the same f32 logits, the f64 arithmetic in another order
    assert!(expected.is_finite() && expected > 0.0, "{expected}");
    assert!(
        (got - expected).abs() < 1e-9 * (1.0 + expected),
        "{got} vs {expected}"
    );
}

/// Rows without a tail to draw from (here a teacher whose tail is below e^-60) are left out of the
/// draws: the other rows draw exactly as they would alone (the draws of a call run over the rows
/// drawn from, in order, from its seed), and the sharp row keeps its bucket.
#[test]
fn rows_without_a_tail_to_draw_from_leave_the_others_draws_unchanged() {
    use distill::teacher::store::select::{select, Selection, CLOSED_TAIL};
    let v = 64i64;
    let normal: Vec<f32> = (0..v).map(|i| 3.0 - i as f32 * 0.07).collect();
    let sharp: Vec<f32> = (0..v).map(|i| if i == 0 { 90.0 } else { 0.0 }).collect();
    let sel = Selection {
        coverage: 0.5,
        max_k: 4,
        temperature: 1.0,
        quantisation: Quant::F16,
        tail_samples: 16,
    };
    let both = Tensor::from_slice(&[sharp.clone(), normal.clone()].concat()).view([2, v]);
    let alone = Tensor::from_slice(&normal).view([1, v]);
    for seed in [1u64, 7, 42] {
        let got = select(&both, &[0, 5], &sel, seed).unwrap();
        let want = select(&alone, &[5], &sel, seed).unwrap().remove(0);
        assert_eq!(got[1], want, "seed {seed}: the drawing row as alone");
        assert_ne!(
            got[0].log_tail, CLOSED_TAIL,
            "the sharp row keeps its bucket"
        );
        assert!(got[0].log_tail < -60.0, "{}", got[0].log_tail);
        assert_eq!(want.log_tail, CLOSED_TAIL);
    }
}
