//! `distill generate-data` on tiny models: divergence-aware selection keeps the answers with the
//! largest teacher − student mean log-probability (recomputed here in f64 from both models'
//! logits); the temperature schedule gives each sample its temperature (τ = 0 is the plain greedy
//! answer); a killed run resumes to the same bytes; the file trains; a record's "weight" scales its
//! tokens in every loss kind; distilling step-by-step's two tasks; the refusals.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code, unused_imports))]
mod common;
use common::*;
use distill::data::{self, Batch, DataConfig, DataFormat};
use distill::generate::{dasd, data as gd, generate_batch, GenerateOptions};
use distill::model::{self, LlamaConfig, LoadedModel, Tokenizer};
use distill::objective::{LossTerm, Objective};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const EOS: u32 = 256;
const V: usize = 259;

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = LlamaConfig::tiny(V, 48, 2, 4, 2);
        cfg.eos_token_ids = vec![EOS];
        let save = |seed: i64, scale: f64, name: &str| {
            let mut m = model::random(&cfg, Device::Cpu, seed).unwrap();
            tch::no_grad(|| {
                let mut e = m.vs.variables()["model.embed_tokens.weight"].shallow_clone();
                let _ = e.f_mul_scalar_(scale).unwrap();
            });
            m.tokenizer = Some(Tokenizer::byte_level(SPECIALS).unwrap());
            m.save_hf(&dir.path().join(name)).unwrap();
        };
        // a sharper teacher than student: their log-probabilities differ by a lot
        save(7, 4.0, "teacher");
        save(8, 1.0, "student");
        let words = [
            "the cat", "a dog", "one mat", "far away", "it ran", "we sat",
        ];
        let prompts: String = (0..7)
            .map(|i| format!("{{\"prompt\": \"{} {}\"}}\n", words[i % 6], i))
            .collect();
        std::fs::write(dir.path().join("prompts.jsonl"), prompts).unwrap();
        let labelled: String = (0..4)
            .map(|i| {
                format!(
                    "{{\"prompt\": \"{i} + {i} =\", \"answer\": \"{}\"}}\n",
                    2 * i
                )
            })
            .collect();
        std::fs::write(dir.path().join("labelled.jsonl"), labelled).unwrap();
        Setup { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// A run file whose [generate_data] writes `out`, with `extra` lines in that section; training
    /// reads `out`.
    fn run_file(&self, name: &str, out: &str, extra: &str) -> PathBuf {
        let text = format!(
            r#"
[teacher]
path = "teacher"

[student]
path = "student"

[data]
train = "{out}"
format = "jsonl"
seq_len = 64
packing = false
validation_fraction = 0.2

[[loss]]
kind = "cross_entropy"

[optim]
lr = 3e-3
micro_batch = 2

[run]
steps = 2
eval_every = 2
threads = 1
seed = 5
output = "run-{name}"

[generate_data]
prompts = "prompts.jsonl"
out = "{out}"
samples = 4
keep = 2
temperatures = [1.5, 0.5]
max_new_tokens = 12
batch = 3
{extra}
"#
        );
        let p = self.path(&format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    }
}

fn ok(args: &[&str]) -> String {
    let out = distill(args);
    assert!(
        out.status.success(),
        "distill {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn load(s: &Setup, name: &str) -> LoadedModel {
    model::load(&s.path(name), Device::Cpu).unwrap()
}

/// The sampled answer of prompt `index`, sample k (as the generator draws it for one row), with
/// its end of sequence when one was drawn: (tokens without the end, scored tokens).
fn sample(
    teacher: &LoadedModel,
    prompt: &[u32],
    seed: u64,
    index: usize,
    k: usize,
    temperature: f64,
) -> (Vec<u32>, Vec<u32>) {
    let opts = GenerateOptions {
        max_new_tokens: 12,
        temperature,
        top_p: 1.0,
        seed,
        stop_ids: vec![EOS],
    };
    let g = generate_batch(
        &teacher.model,
        &[prompt.to_vec()],
        &[gd::row_seed(seed, index, k)],
        &opts,
        |_, _| Ok(()),
    )
    .unwrap()
    .remove(0);
    let mut scored = g.tokens.clone();
    if g.finish == distill::generate::Finish::Stop {
        scored.push(EOS);
    }
    (g.tokens, scored)
}

/// Mean over the answer's tokens of log softmax(logits)[token], in f64 from one unpadded forward
/// pass of prompt ++ answer; and the largest |logit| seen.
fn mean_logprob_f64(m: &LoadedModel, prompt: &[u32], answer: &[u32]) -> (f64, f64) {
    let ids: Vec<i64> = prompt.iter().chain(answer).map(|&x| x as i64).collect();
    let logits = tch::no_grad(|| {
        m.model
            .forward(&Tensor::from_slice(&ids).unsqueeze(0))
            .unwrap()
    });
    let host = Vec::<f64>::try_from(&logits.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    let (mut sum, mut big) = (0.0, 0.0f64);
    for (j, &y) in answer.iter().enumerate() {
        let row = &host[(prompt.len() + j - 1) * V..(prompt.len() + j) * V];
        let mx = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z = mx + row.iter().map(|a| (a - mx).exp()).sum::<f64>().ln();
        sum += row[y as usize] - z;
        big = row.iter().fold(big, |a, x| a.max(x.abs()));
    }
    (sum / answer.len() as f64, big)
}

fn prompt_ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, true).unwrap()
}

#[test]
fn selection_keeps_the_answers_the_student_is_furthest_from() {
    let s = Setup::new();
    let run = s.run_file("sel", "sel.jsonl", "");
    let stdout = ok(&["generate-data", run.to_str().unwrap()]);
    assert!(stdout.contains("7 prompts, 28 answers"), "{stdout}");
    let recs = read_records(&s.path("sel.jsonl"));
    assert_eq!(recs.len(), 7 * 2, "keep = 2 of 4 per prompt");
    let (teacher, student) = (load(&s, "teacher"), load(&s, "student"));
    let tok = teacher.tokenizer.as_ref().unwrap();
    let lines: Vec<Value> = std::fs::read_to_string(s.path("prompts.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut strict = 0usize;
    for (i, line) in lines.iter().enumerate() {
        let text = line["prompt"].as_str().unwrap();
        let p = prompt_ids(tok, text);
        // every sample: its temperature (linear from 1.5 to 0.5 over 4), its f64 score
        let mut scored = Vec::new();
        for k in 0..4 {
            let tau = 1.5 + (0.5 - 1.5) * k as f64 / 3.0;
            let (y, with_end) = sample(&teacher, &p, 5, i, k, tau);
            let (lt, bt) = mean_logprob_f64(&teacher, &p, &with_end);
            let (ls, bs) = mean_logprob_f64(&student, &p, &with_end);
            scored.push((k, tau, tok.decode(&y, true).unwrap(), lt, ls, bt.max(bs)));
        }
        let got: Vec<&Value> = recs
            .iter()
            .filter(|r| r["line"] == (i + 1) as u64)
            .collect();
        assert_eq!(got.len(), 2);
        let kept: Vec<usize> = got
            .iter()
            .map(|r| r["sample"].as_u64().unwrap() as usize)
            .collect();
        assert!(kept[0] < kept[1], "in sample order");
        // the f32 forward (batched, padded) against this f64 log-softmax of an unbatched f32
        // forward: each log-probability off by a few ε·(|logit| + ln V) from the log-softmax's
        // rounding, and the logits themselves by the forward's rounding, a few ε per layer times
        // their size; 64 ε·(max|logit| + ln V) bounds both
        let big = scored.iter().fold(0.0f64, |a, x| a.max(x.5));
        let tol = 64.0 * f32::EPSILON as f64 * (big + (V as f64).ln());
        let score = |k: usize| scored[k].3 - scored[k].4;
        // every kept answer scores above every dropped one; closer than the tolerance only when
        // the two answers are the same text (an exact tie)
        for &k in &kept {
            for j in (0..4).filter(|j| !kept.contains(j)) {
                if score(k) - score(j) > 2.0 * tol {
                    strict += 1;
                } else {
                    assert_eq!(
                        scored[k].2,
                        scored[j].2,
                        "prompt {i}: kept {k} ({}) below dropped {j} ({})",
                        score(k),
                        score(j)
                    );
                }
            }
        }
        for (r, &k) in got.iter().zip(&kept) {
            let (_, tau, text, lt, ls, _) = &scored[k];
            assert_eq!(r["temperature"].as_f64().unwrap(), *tau);
            assert_eq!(r["prompt"], line["prompt"]);
            assert_eq!(r["response"].as_str().unwrap(), text);
            assert_eq!(r["seed"], 5);
            assert_eq!(r["row_seed"].as_u64().unwrap(), gd::row_seed(5, i, k));
            let (rt, rs, sc) = (
                r["teacher_logp"].as_f64().unwrap(),
                r["student_logp"].as_f64().unwrap(),
                r["score"].as_f64().unwrap(),
            );
            assert!((rt - lt).abs() <= tol, "teacher {rt} vs {lt} (tol {tol})");
            assert!((rs - ls).abs() <= tol, "student {rs} vs {ls} (tol {tol})");
            assert_eq!(sc, rt - rs);
        }
    }
    assert!(
        strict >= 7 * 2,
        "only {strict} strict (kept, dropped) pairs: the test proves little"
    );
}

#[test]
fn the_temperature_schedule_gives_each_sample_its_temperature() {
    assert_eq!(dasd::temperature(&[0.7], 3, 4), 0.7);
    assert_eq!(dasd::temperature(&[1.0, 0.5], 0, 1), 1.0);
    let s = Setup::new();
    let run = s.run_file(
        "sched",
        "sched.jsonl",
        "", // overridden below
    );
    ok(&[
        "generate-data",
        run.to_str().unwrap(),
        "--set",
        "generate_data.samples=3",
        "--set",
        "generate_data.keep=3",
        "--set",
        "generate_data.temperatures=[2.0, 0.0]",
    ]);
    let recs = read_records(&s.path("sched.jsonl"));
    assert_eq!(recs.len(), 7 * 3);
    let teacher = load(&s, "teacher");
    let tok = teacher.tokenizer.as_ref().unwrap();
    for (n, r) in recs.iter().enumerate() {
        let k = n % 3;
        assert_eq!(r["sample"], k as u64);
        assert_eq!(r["temperature"].as_f64().unwrap(), [2.0, 1.0, 0.0][k]);
        if k == 2 {
            // τ = 0: the greedy answer, here by argmax over a full forward pass per token
            let mut ids = prompt_ids(tok, r["prompt"].as_str().unwrap());
            let start = ids.len();
            for _ in 0..12 {
                let x: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
                let logits = tch::no_grad(|| {
                    teacher
                        .model
                        .forward(&Tensor::from_slice(&x).unsqueeze(0))
                        .unwrap()
                });
                let next = logits.select(1, -1).argmax(-1, false).int64_value(&[0]) as u32;
                if next == EOS {
                    break;
                }
                ids.push(next);
            }
            assert_eq!(
                r["response"].as_str().unwrap(),
                tok.decode(&ids[start..], true).unwrap()
            );
        }
    }
}

#[test]
fn a_cut_file_resumes_to_the_bytes_of_an_uninterrupted_run() {
    let s = Setup::new();
    let run = s.run_file("full", "full.jsonl", "");
    ok(&["generate-data", run.to_str().unwrap()]);
    let whole = std::fs::read(s.path("full.jsonl")).unwrap();
    // refused without --resume or --overwrite, the file untouched
    let out = distill(&["generate-data", run.to_str().unwrap()]);
    assert_clean_failure(&out, &["full.jsonl", "--resume", "--overwrite"]);
    assert_eq!(std::fs::read(s.path("full.jsonl")).unwrap(), whole);
    // cut inside the second batch's records (whole lines) and then inside a line (torn)
    let nl: Vec<usize> = whole
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .map(|(i, _)| i + 1)
        .collect();
    for cut in [nl[7], nl[7] + 9, nl[5], 3, 0] {
        std::fs::write(s.path("full.jsonl"), &whole[..cut]).unwrap();
        ok(&["generate-data", run.to_str().unwrap(), "--resume"]);
        assert!(
            std::fs::read(s.path("full.jsonl")).unwrap() == whole,
            "cut at byte {cut}: the resumed file differs"
        );
    }
    // --overwrite starts again, to the same bytes
    ok(&["generate-data", run.to_str().unwrap(), "--overwrite"]);
    assert_eq!(std::fs::read(s.path("full.jsonl")).unwrap(), whole);
}

// uses the DISTILL_FAULT_DIE_AFTER_PROMPTS hook: built with `--features fault-injection`
#[cfg(feature = "fault-injection")]
#[test]
fn a_killed_run_resumes_to_the_bytes_of_an_uninterrupted_run() {
    let s = Setup::new();
    let full = s.run_file("full", "full.jsonl", "");
    ok(&["generate-data", full.to_str().unwrap()]);
    let whole = std::fs::read(s.path("full.jsonl")).unwrap();
    let run = s.run_file("killed", "killed.jsonl", "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["generate-data", run.to_str().unwrap()])
        .env("DISTILL_FAULT_DIE_AFTER_PROMPTS", "4")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the run was not killed");
    let part = std::fs::read(s.path("killed.jsonl")).unwrap();
    // batches of 3: killed once the batch reaching 4 prompts was written, 6 prompts × 2 records
    assert_eq!(part.iter().filter(|&&b| b == b'\n').count(), 12);
    assert!(whole.starts_with(&part));
    // and a torn write after it
    let mut torn = part.clone();
    torn.extend_from_slice(b"{\"prompt\": \"the ca");
    std::fs::write(s.path("killed.jsonl"), torn).unwrap();
    let stdout = ok(&["generate-data", run.to_str().unwrap(), "--resume"]);
    assert!(stdout.contains("resumed after 6 prompts"), "{stdout}");
    assert_eq!(std::fs::read(s.path("killed.jsonl")).unwrap(), whole);
}

#[test]
fn the_written_files_train() {
    let s = Setup::new();
    // plain prompts, chat prompts and step-by-step records, each trained for 2 steps
    for (name, extra) in [
        ("plain", ""),
        ("chat", "chat = true"),
        (
            "sbs",
            "prompts = \"labelled.jsonl\"\nkeep = 1\nrationale_template = \"Q: {input} A: {label}. Why?\"\nrationale_weight = 0.5",
        ),
    ] {
        let extra = extra.replace("prompts = \"labelled.jsonl\"\n", "");
        let run = s.run_file(name, &format!("{name}.jsonl"), &extra);
        if name == "sbs" {
            let text = std::fs::read_to_string(&run)
                .unwrap()
                .replace("prompts = \"prompts.jsonl\"", "prompts = \"labelled.jsonl\"")
                .replace("keep = 2\n", "");
            std::fs::write(&run, text).unwrap();
        }
        ok(&["generate-data", run.to_str().unwrap()]);
        let recs = read_records(&s.path(&format!("{name}.jsonl")));
        match name {
            "chat" => {
                let m = recs[0]["messages"].as_array().unwrap();
                assert_eq!(m.len(), 2);
                assert_eq!(m[0]["role"], "user");
                assert_eq!(m[1]["role"], "assistant");
                assert!(recs[0].get("prompt").is_none());
            }
            "sbs" => {
                assert_eq!(recs.len(), 4 * 2, "one label and one rationale record each");
                for (i, pair) in recs.chunks(2).enumerate() {
                    assert_eq!(pair[0]["prompt"], format!("[label] {i} + {i} ="));
                    assert_eq!(pair[0]["response"], format!("{}", 2 * i));
                    assert!(pair[0].get("weight").is_none());
                    assert_eq!(pair[1]["prompt"], format!("[rationale] {i} + {i} ="));
                    assert_eq!(pair[1]["weight"], 0.5);
                    assert_eq!(pair[1]["task"], "rationale");
                }
                // the teacher read the template with the label filled in
                let teacher = load(&s, "teacher");
                let tok = teacher.tokenizer.as_ref().unwrap();
                let r = &recs[3];
                let k = r["sample"].as_u64().unwrap() as usize;
                let tau = 1.5 + (0.5 - 1.5) * k as f64 / 3.0;
                let p = prompt_ids(tok, "Q: 1 + 1 = A: 2. Why?");
                let (y, _) = sample(&teacher, &p, 5, 1, k, tau);
                assert_eq!(r["response"].as_str().unwrap(), tok.decode(&y, true).unwrap());
            }
            _ => {}
        }
        ok(&["train", run.to_str().unwrap()]);
        assert!(s.path(&format!("run-{name}/student/model.safetensors")).exists());
    }
}

/// Random f64 logits (B, T, V).
fn logits(seed: i64, b: usize, t: usize) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn([b as i64, t as i64, V as i64], (Kind::Double, Device::Cpu)) * 3.0
}

#[test]
fn a_records_weight_scales_its_tokens_in_every_loss() {
    let s = Setup::new();
    let file = s.path("weighted.jsonl");
    std::fs::write(
        &file,
        "{\"prompt\": \"the cat\", \"response\": \" sat on a mat\"}\n\
         {\"prompt\": \"a dog\", \"response\": \" ran far\", \"weight\": 2.5, \"score\": 1.0}\n",
    )
    .unwrap();
    let tok = Tokenizer::byte_level(SPECIALS).unwrap();
    let cfg = DataConfig {
        train: file.clone(),
        validation: Some(file.clone()),
        format: DataFormat::Jsonl,
        seq_len: 24,
        packing: false,
        validation_fraction: 0.0,
        max_train_tokens: None,
        max_validation_sequences: None,
        sources: vec![],
        ddk: None,
    };
    let ds = data::load(&cfg, &tok, Some(EOS)).unwrap();
    let (a, b) = (&ds.train[0], &ds.train[1]);
    // every target of the weighted record weighs 2.5, of the other 1; the same positions count
    assert!(a.weights.iter().all(|&w| w == 0.0 || w == 1.0));
    assert!(b.weights.iter().all(|&w| w == 0.0 || w == 2.5));
    let (na, nb) = (a.counted() as f64, b.counted() as f64);
    assert_eq!(
        nb,
        " ran far".len() as f64 + 1.0,
        "the response and its end"
    );
    let mut unweighted = b.clone();
    for w in unweighted.weights.iter_mut().filter(|w| **w != 0.0) {
        *w = 1.0;
    }
    let (ta, tb) = (logits(1, 1, 24), logits(2, 1, 24));
    let (sa, sb) = (logits(3, 1, 24), logits(4, 1, 24));
    let both = |x: &Tensor, y: &Tensor| Tensor::cat(&[x, y], 0);
    let batch_ab = Batch::all(&[a.clone(), b.clone()], Device::Cpu).unwrap();
    let batch_a = Batch::all(std::slice::from_ref(a), Device::Cpu).unwrap();
    let batch_b = Batch::all(&[unweighted], Device::Cpu).unwrap();
    let kinds: Vec<(&str, Vec<(&str, f64)>)> = vec![
        ("cross_entropy", vec![]),
        ("forward_kl", vec![]),
        ("reverse_kl", vec![]),
        ("jsd", vec![]),
        ("skew_kl", vec![]),
        ("skew_reverse_kl", vec![]),
        ("tvd", vec![]),
        ("hinton", vec![]),
        ("adaptive_kl", vec![]),
        ("taid", vec![]),
        ("pld", vec![]),
        // its entropy part thresholds at a quantile over the batch's tokens: left out here
        ("token_selective", vec![("w_entropy", 0.0)]),
    ];
    for (kind, params) in &kinds {
        let value = |batch: &Batch, s: &Tensor, t: &Tensor| -> f64 {
            let obj = Objective::new(&[LossTerm::new(kind, params, 1.0).unwrap()], 10).unwrap();
            let dist = distill::teacher::TeacherDist::Dense(t.shallow_clone());
            obj.compute(s, Some(&dist), &batch.labels, &batch.weights)
                .unwrap()
                .total
                .double_value(&[])
        };
        let lab = value(&batch_ab, &both(&sa, &sb), &both(&ta, &tb));
        let la = value(&batch_a, &sa, &ta);
        let lb = value(&batch_b, &sb, &tb);
        // Σ w·ℓ / Σ w with the weighted record's tokens at 2.5: its sum of losses counts 2.5 times
        let want = (na * la + 2.5 * nb * lb) / (na + 2.5 * nb);
        assert!(
            (lab - want).abs() <= 1e-12 * want.abs().max(1.0),
            "{kind}: {lab} vs {want}"
        );
    }
    // and the cross-entropy against a plain f64 computation
    let host = |x: &Tensor| Vec::<f64>::try_from(&x.flatten(0, -1)).unwrap();
    let sl = host(&both(&sa, &sb));
    let labels = Vec::<i64>::try_from(&batch_ab.labels.flatten(0, 1)).unwrap();
    let weights: Vec<f64> = a
        .weights
        .iter()
        .chain(&b.weights)
        .map(|&w| w as f64)
        .collect();
    let (mut num, mut den) = (0.0, 0.0);
    for (pos, (&l, &w)) in labels.iter().zip(&weights).enumerate() {
        if l < 0 || w == 0.0 {
            continue;
        }
        let row = &sl[pos * V..(pos + 1) * V];
        let mx = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
        num += w * (z - row[l as usize]);
        den += w;
    }
    let obj = Objective::new(&[LossTerm::new("cross_entropy", &[], 1.0).unwrap()], 10).unwrap();
    let got = obj
        .compute(&both(&sa, &sb), None, &batch_ab.labels, &batch_ab.weights)
        .unwrap()
        .total
        .double_value(&[]);
    assert!(
        (got - num / den).abs() <= 1e-12 * got.abs(),
        "{got} vs {}",
        num / den
    );
}

#[test]
fn bad_inputs_give_one_clear_error() {
    let s = Setup::new();
    let bad = |name: &str, extra: &str, set: &[&str], needles: &[&str]| {
        let run = s.run_file(name, &format!("{name}.jsonl"), extra);
        let mut args = vec!["generate-data", run.to_str().unwrap()];
        for x in set {
            args.extend(["--set", x]);
        }
        assert_clean_failure(&distill(&args), needles);
        assert!(
            !s.path(&format!("{name}.jsonl")).exists(),
            "{name}: nothing written"
        );
    };
    bad(
        "missing",
        "",
        &["generate_data.prompts=nowhere.jsonl"],
        &["nowhere.jsonl"],
    );
    bad("unknown", "sampels = 3", &[], &["unknown.toml:", "sampels"]);
    bad(
        "keep",
        "",
        &["generate_data.keep=5"],
        &["generate_data.keep", "samples = 4"],
    );
    bad(
        "temps",
        "",
        &["generate_data.temperatures=[1.0, 0.5, 0.2]"],
        &["generate_data.temperatures"],
    );
    bad(
        "template",
        "rationale_template = \"{input} is {label}\"",
        &[],
        &["prompts.jsonl:1:", "rationale_template", "\"answer\""],
    );
    bad(
        "noplace",
        "rationale_template = \"{input} only\"",
        &[],
        &["generate_data.rationale_template", "{label}"],
    );
    bad(
        "weight",
        "rationale_weight = 0.5",
        &[],
        &["generate_data.rationale_weight", "rationale_template"],
    );
    // a run file without the section
    let run = s.path("nosection.toml");
    let text = std::fs::read_to_string(s.run_file("x", "x.jsonl", "")).unwrap();
    let cut = text.find("[generate_data]").unwrap();
    std::fs::write(&run, &text[..cut]).unwrap();
    assert_clean_failure(
        &distill(&["generate-data", run.to_str().unwrap()]),
        &["nosection.toml", "[generate_data]"],
    );
    // training data with a bad weight: the file's line
    std::fs::write(
        s.path("badweight.jsonl"),
        "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\", \"response\": \"b\", \"weight\": -1}\n",
    )
    .unwrap();
    let run = s.run_file("bw", "badweight.jsonl", "");
    assert_clean_failure(
        &distill(&["train", run.to_str().unwrap()]),
        &["badweight.jsonl:2:", "'weight'"],
    );
}
