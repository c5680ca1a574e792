//! Vocabulary and template reconciliation (`teacher::vocab`, `distill check`): real padded pairs
//! (a tiny model whose embedding has rows beyond its 259-token tokenizer next to one without),
//! a token at another id, tokens on one side only, chat templates, and the identity's cost.
mod common;
use common::*;
use distill::data::{Batch, IGNORE_INDEX};
use distill::model::{self, LlamaConfig, LoadedModel, Tokenizer};
use distill::objective::{LossTerm, Objective};
use distill::teacher::vocab::{self, Side, Templates, VocabMap, VocabReport};
use distill::teacher::{Live, SparseDist, TeacherDist, TeacherSignal};
use serde_json::Value;
use std::path::Path;
use tch::{Device, Kind, Tensor};

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// the byte-level tokenizer's ids: 256 bytes and 3 specials
const TOKENS: usize = 259;
const TEXT: &str = "the cat sat on a mat and the dog ran to a bag; abba baa bab. ";

/// A tiny model of `rows` embedding rows with the 259-token tokenizer; embeddings scaled so that
/// its distributions are far from uniform, and padding rows (tied to the head) copied from common
/// tokens' rows so that they carry real mass, as a trained model's padding rows need not.
fn tiny(rows: usize, seed: i64, tok: Tokenizer) -> LoadedModel {
    let mut cfg = LlamaConfig::tiny(rows, 32, 1, 4, 2);
    cfg.eos_token_ids = vec![256];
    cfg.max_position_embeddings = 64;
    let mut m = model::random(&cfg, Device::Cpu, seed).unwrap();
    tch::no_grad(|| {
        let mut e = m.vs.variables()["model.embed_tokens.weight"].shallow_clone();
        let _ = e.f_mul_scalar_(60.0).unwrap();
        for (k, row) in (TOKENS as i64..rows as i64).enumerate() {
            let from = [32i64, 97, 116, 101, 98][k % 5]; // ' ', a, t, e, b
            e.narrow(0, row, 1).copy_(&e.narrow(0, from, 1));
        }
    });
    m.tokenizer = Some(tok);
    m
}

fn byte_level() -> Tokenizer {
    Tokenizer::byte_level(SPECIALS).unwrap()
}

/// The byte-level tokenizer with the ids of 'a' (97) and 'b' (98) swapped in its JSON.
fn swapped() -> Tokenizer {
    let base = byte_level();
    let mut j: Value = serde_json::from_str(base.json()).unwrap();
    let vocab = j["model"]["vocab"].as_object_mut().unwrap();
    assert_eq!(
        (vocab["a"].as_u64(), vocab["b"].as_u64()),
        (Some(97), Some(98))
    );
    vocab.insert("a".into(), 98.into());
    vocab.insert("b".into(), 97.into());
    let cfg = serde_json::json!({"eos_token": SPECIALS[0], "chat_template": base.chat_template});
    Tokenizer::from_json(j.to_string(), Some(&cfg), Path::new("<swapped>")).unwrap()
}

fn compare(t: &LoadedModel, s: &LoadedModel) -> distill::Result<(VocabReport, VocabMap)> {
    vocab::compare(
        Side {
            source: Path::new("teacher"),
            tokenizer: t.tokenizer.as_ref().unwrap(),
            rows: t.model.config.vocab_size,
        },
        Side {
            source: Path::new("student"),
            tokenizer: s.tokenizer.as_ref().unwrap(),
            rows: s.model.config.vocab_size,
        },
    )
}

fn host(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// A batch of `tok`'s ids of TEXT, (2, 12), labels the next id (ignored at each row's end).
fn batch(tok: &Tokenizer) -> Batch {
    let ids: Vec<i64> = tok.encode(TEXT, false).unwrap()[..24]
        .iter()
        .map(|&i| i as i64)
        .collect();
    let ids = Tensor::from_slice(&ids).view([2, 12]);
    let labels = Tensor::cat(
        &[
            ids.narrow(1, 1, 11),
            Tensor::full([2, 1], IGNORE_INDEX, (Kind::Int64, Device::Cpu)),
        ],
        1,
    );
    Batch::from_ids_labels(&ids, &labels).unwrap()
}

/// The teacher's logits at every position of `b`, unmapped: (N, Vt).
fn teacher_logits(t: &LoadedModel, b: &Batch) -> Tensor {
    let live = Live::new(&t.model);
    let p = live.prepare(b, &[]).unwrap();
    match p.positions(0, p.len()).unwrap() {
        TeacherDist::Dense(x) => x,
        TeacherDist::Sparse(_) => unreachable!(),
    }
}

/// log softmax(x / T) over x in f64.
fn log_softmax(x: &[f64], temperature: f64) -> Vec<f64> {
    let z: Vec<f64> = x.iter().map(|v| v / temperature).collect();
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    z.iter().map(|v| v - lse).collect()
}

/// The objective used below, forward_kl(T=2) + 0.5 × reverse_kl(T=1), written plainly in f64 over
/// the first `keep` columns of each side (both renormalised over them), mean over counted positions.
fn reference(s: &[f64], vs: usize, t: &[f64], vt: usize, keep: usize, counted: &[bool]) -> f64 {
    let (mut fkl, mut rkl, mut n) = (0.0, 0.0, 0.0);
    for (i, &c) in counted.iter().enumerate() {
        if !c {
            continue;
        }
        let (si, ti) = (&s[i * vs..i * vs + keep], &t[i * vt..i * vt + keep]);
        let (lq2, lp2) = (log_softmax(si, 2.0), log_softmax(ti, 2.0));
        let (lq1, lp1) = (log_softmax(si, 1.0), log_softmax(ti, 1.0));
        fkl += (0..keep)
            .map(|v| lp2[v].exp() * (lp2[v] - lq2[v]))
            .sum::<f64>();
        rkl += (0..keep)
            .map(|v| lq1[v].exp() * (lq1[v] - lp1[v]))
            .sum::<f64>();
        n += 1.0;
    }
    (fkl + 0.5 * rkl) / n
}

/// The objective through the live teacher with the map, in f64 (the map only selects columns, so
/// f64 arithmetic on the same f32 logits separates the map's semantics from rounding).
fn objective_with_map(t: &LoadedModel, s: &LoadedModel, map: &VocabMap, b: &Batch) -> f64 {
    let obj = Objective::new(
        &[
            LossTerm::new("forward_kl", &[("temperature", 2.0)], 1.0).unwrap(),
            LossTerm::new("reverse_kl", &[("temperature", 1.0)], 0.5).unwrap(),
        ],
        1,
    )
    .unwrap();
    let live = Live::new(&t.model).with_vocab(map);
    assert_eq!(live.vocab_size(), map.width());
    let p = live.prepare(b, &[]).unwrap();
    let dist = match p.positions(0, p.len()).unwrap() {
        TeacherDist::Dense(x) => TeacherDist::Dense(x.to_kind(Kind::Double)),
        TeacherDist::Sparse(_) => unreachable!(),
    };
    let student = s
        .model
        .forward(&b.ids)
        .unwrap()
        .flatten(0, 1)
        .to_kind(Kind::Double);
    let (labels, weights) = b.flat_targets().unwrap();
    let v =
        distill::losses::trusted(|| obj.compute(&student, Some(&dist), &labels, &weights)).unwrap();
    v.total.double_value(&[])
}

/// The f64 rounding of a few hundred log-sum-exp terms of magnitude < 100: far below this.
const F64_TOL: f64 = 1e-9;

fn counted(b: &Batch) -> Vec<bool> {
    b.host_weights().iter().map(|&w| w != 0.0).collect()
}

#[test]
fn a_padded_teacher_is_masked_and_its_objective_equals_the_reference() {
    let (t, s) = (tiny(264, 1, byte_level()), tiny(TOKENS, 2, byte_level()));
    let (r, map) = compare(&t, &s).unwrap();
    assert!(r.identical_tokenizers);
    assert_eq!((r.teacher_tokens, r.student_tokens), (TOKENS, TOKENS));
    assert_eq!((r.teacher_rows, r.student_rows), (264, 259));
    assert_eq!((r.teacher_padding_rows, r.student_padding_rows), (5, 0));
    assert_eq!((r.shared_ids, r.remapped), (TOKENS, 0));
    assert_eq!(r.templates, Templates::Same);
    assert!(!map.translates_ids() && !map.is_identity());
    assert!(
        r.summary()
            .contains("rows teacher 264 (5 padding), student 259 (0 padding)"),
        "{}",
        r.summary()
    );

    let b = batch(s.tokenizer.as_ref().unwrap());
    let value = objective_with_map(&t, &s, &map, &b);
    let sl = host(&s.model.forward(&b.ids).unwrap());
    let tl = host(&teacher_logits(&t, &b));
    let want = reference(&sl, 259, &tl, 264, TOKENS, &counted(&b));
    assert!(
        (value - want).abs() <= F64_TOL * want.abs().max(1.0),
        "{value} vs {want}"
    );

    // the teacher's mass on its padding rows, against f64 on the same logits (padding_mass runs
    // one row at a time)
    let m = vocab::padding_mass(&t.model, &map, &b).unwrap().unwrap();
    let (mut masses, mut bound) = (vec![], 0.0f64);
    for row in 0..2 {
        let l = host(&t.model.forward(&b.ids.narrow(0, row, 1)).unwrap());
        for pos in l.chunks(264) {
            let lp = log_softmax(pos, 1.0);
            masses.push(lp[TOKENS..].iter().map(|x| x.exp()).sum::<f64>());
            bound = bound.max(pos.iter().fold(0.0, |a: f64, x| a.max(x.abs())));
        }
    }
    // f32 log-softmax then log-sum-exp: each log-probability off by a few ε·(|logit| + log V),
    // so each mass by that relative amount
    let rel = 8.0 * f32::EPSILON as f64 * (bound + 264f64.ln());
    let mean = masses.iter().sum::<f64>() / masses.len() as f64;
    let max = masses.iter().copied().fold(0.0, f64::max);
    assert_eq!(m.positions, 22, "the counted positions");
    // every position counted but each row's last: recompute the mean over those
    let kept: Vec<f64> = masses
        .iter()
        .zip(counted(&b))
        .filter(|(_, c)| *c)
        .map(|(&x, _)| x)
        .collect();
    let kmean = kept.iter().sum::<f64>() / kept.len() as f64;
    let kmax = kept.iter().copied().fold(0.0, f64::max);
    assert!(
        (m.mean - kmean).abs() <= rel * kmean + 1e-12,
        "{} vs {kmean}",
        m.mean
    );
    assert!(
        (m.max - kmax).abs() <= rel * kmax + 1e-12,
        "{} vs {kmax}",
        m.max
    );
    assert!(
        mean > 0.0 && max <= 1.0 && m.mean > 1e-3,
        "padding rows carry mass: {m:?}"
    );
}

#[test]
fn padding_on_both_sides_is_masked_from_both() {
    // the same 264 rows on both sides (Qwen2.5's case): the 5 padding rows are removed from both
    // distributions, not compared
    let (t, s) = (tiny(264, 3, byte_level()), tiny(264, 4, byte_level()));
    let (r, map) = compare(&t, &s).unwrap();
    assert_eq!((r.teacher_padding_rows, r.student_padding_rows), (5, 5));
    assert_eq!(map.width(), TOKENS);
    let b = batch(s.tokenizer.as_ref().unwrap());
    let value = objective_with_map(&t, &s, &map, &b);
    let sl = host(&s.model.forward(&b.ids).unwrap());
    let tl = host(&teacher_logits(&t, &b));
    let want = reference(&sl, 264, &tl, 264, TOKENS, &counted(&b));
    assert!(
        (value - want).abs() <= F64_TOL * want.abs().max(1.0),
        "{value} vs {want}"
    );
    // and the test can tell: comparing every row gives another value
    let all_rows = reference(&sl, 264, &tl, 264, 264, &counted(&b));
    assert!(
        (all_rows - want).abs() > 1e3 * F64_TOL,
        "{all_rows} vs {want}"
    );
}

#[test]
fn a_padded_student_is_masked_and_its_objective_equals_the_reference() {
    let (t, s) = (tiny(TOKENS, 5, byte_level()), tiny(264, 6, byte_level()));
    let (r, map) = compare(&t, &s).unwrap();
    assert_eq!((r.teacher_padding_rows, r.student_padding_rows), (0, 5));
    assert!(
        map.is_identity(),
        "the teacher's distribution passes as it is"
    );
    assert_eq!(map.width(), TOKENS);
    assert!(
        r.summary().contains("student 264 (5 padding)"),
        "{}",
        r.summary()
    );
    let b = batch(s.tokenizer.as_ref().unwrap());
    let value = objective_with_map(&t, &s, &map, &b);
    let sl = host(&s.model.forward(&b.ids).unwrap());
    let tl = host(&teacher_logits(&t, &b));
    let want = reference(&sl, 264, &tl, 259, TOKENS, &counted(&b));
    assert!(
        (value - want).abs() <= F64_TOL * want.abs().max(1.0),
        "{value} vs {want}"
    );
    // no padding rows on the teacher: nothing to measure, nothing run
    assert!(vocab::padding_mass(&t.model, &map, &b).unwrap().is_none());
}

#[test]
fn identity_maps_cost_nothing() {
    let (t, s) = (tiny(TOKENS, 7, byte_level()), tiny(TOKENS, 8, byte_level()));
    let (_, map) = compare(&t, &s).unwrap();
    assert!(map.is_identity() && !map.translates_ids());
    let logits = Tensor::randn([6, TOKENS as i64], (Kind::Float, Device::Cpu));
    let ptr = logits.data_ptr();
    match map.apply(TeacherDist::Dense(logits)).unwrap() {
        TeacherDist::Dense(x) => assert_eq!(x.data_ptr(), ptr, "the same storage"),
        _ => unreachable!(),
    }
    let ids = Tensor::from_slice(&[1i64, 2, 3]);
    assert_eq!(map.teacher_ids(&ids).unwrap().data_ptr(), ids.data_ptr());
    // a padded teacher with the same ids: a view of the first 259 columns, still no copy
    let (t, s) = (tiny(264, 7, byte_level()), tiny(TOKENS, 8, byte_level()));
    let (_, map) = compare(&t, &s).unwrap();
    let logits = Tensor::randn([6, 264], (Kind::Float, Device::Cpu));
    let ptr = logits.data_ptr();
    match map.apply(TeacherDist::Dense(logits)).unwrap() {
        TeacherDist::Dense(x) => {
            assert_eq!(x.size(), [6, TOKENS as i64]);
            assert_eq!(x.data_ptr(), ptr, "a view");
        }
        _ => unreachable!(),
    }
}

#[test]
fn a_sparse_signal_loses_the_teachers_padding_rows() {
    let (t, s) = (tiny(264, 9, byte_level()), tiny(TOKENS, 10, byte_level()));
    let (_, map) = compare(&t, &s).unwrap();
    let sp = SparseDist {
        indices: Tensor::from_slice(&[260i64, 3, 7, 1, 261, 2]).view([2, 3]),
        logprobs: Tensor::from_slice(&[-0.5f32, -1.0, -2.0, -0.3, -0.7, -3.0]).view([2, 3]),
        log_tail: Tensor::from_slice(&[0.1f32, 0.2]).log(),
        log_z: Tensor::from_slice(&[1.0f32, 2.0]),
        temperature: 1.0,
    };
    let out = match map.apply(TeacherDist::Sparse(sp)).unwrap() {
        TeacherDist::Sparse(x) => x,
        _ => unreachable!(),
    };
    assert_eq!(
        Vec::<i64>::try_from(out.indices.flatten(0, -1)).unwrap(),
        [3, 3, 7, 1, 1, 2],
        "a padding slot takes the index of the row's first valid slot"
    );
    let lp = Vec::<f32>::try_from(out.logprobs.flatten(0, -1)).unwrap();
    assert_eq!(
        lp,
        [f32::NEG_INFINITY, -1.0, -2.0, -0.3, f32::NEG_INFINITY, -3.0]
    );
    assert_eq!(
        Vec::<f32>::try_from(out.log_tail).unwrap(),
        [0.1f32.ln(), 0.2f32.ln()]
    );
}

#[test]
fn a_token_at_another_id_is_remapped() {
    let (t, s) = (tiny(TOKENS, 11, byte_level()), tiny(TOKENS, 12, swapped()));
    let (r, map) = compare(&t, &s).unwrap();
    assert!(!r.identical_tokenizers);
    assert_eq!(
        (r.remapped, r.teacher_padding_rows, r.student_padding_rows),
        (2, 0, 0)
    );
    assert_eq!(
        r.remapped_first
            .iter()
            .map(|x| (x.token.as_str(), x.teacher_id, x.student_id))
            .collect::<Vec<_>>(),
        [("b", 98, 97), ("a", 97, 98)]
    );
    assert!(map.translates_ids());
    assert!(r.summary().contains("2 remapped"), "{}", r.summary());

    // the distribution: columns 97 and 98 exchanged, every other column as it was, exactly
    let logits = Tensor::randn([5, TOKENS as i64], (Kind::Float, Device::Cpu));
    let mapped = match map
        .apply(TeacherDist::Dense(logits.shallow_clone()))
        .unwrap()
    {
        TeacherDist::Dense(x) => x,
        _ => unreachable!(),
    };
    let mut perm: Vec<i64> = (0..TOKENS as i64).collect();
    perm.swap(97, 98);
    let want = logits.index_select(1, &Tensor::from_slice(&perm));
    assert!(mapped.equal(&want));
    assert!(!mapped.equal(&logits));

    // the ids: the student's "ab" is [98, 97]; the teacher gets its own [97, 98]
    let (st, tt) = (s.tokenizer.as_ref().unwrap(), t.tokenizer.as_ref().unwrap());
    assert_eq!(st.encode("ab", false).unwrap(), [98, 97]);
    let ids = Tensor::from_slice(&[98i64, 97, 32]);
    assert_eq!(
        Vec::<i64>::try_from(map.teacher_ids(&ids).unwrap()).unwrap(),
        [97, 98, 32]
    );

    // the live teacher on the student's batch = the teacher on its own batch, columns permuted
    let (sb, tb) = (batch(st), batch(tt));
    assert!(!sb.ids.equal(&tb.ids), "the text holds a and b");
    let live = Live::new(&t.model).with_vocab(&map);
    let p = live.prepare(&sb, &[]).unwrap();
    let got = match p.positions(0, p.len()).unwrap() {
        TeacherDist::Dense(x) => x,
        _ => unreachable!(),
    };
    let own = teacher_logits(&t, &tb);
    assert!(got.equal(&own.index_select(1, &Tensor::from_slice(&perm))));
}

#[test]
fn tokens_on_one_side_only_are_refused_with_the_first_listed() {
    let other = Tokenizer::byte_level(&["<|endoftext|>", "<|a|>", "<|b|>"]).unwrap();
    let (t, s) = (tiny(TOKENS, 13, byte_level()), tiny(TOKENS, 14, other));
    let e = compare(&t, &s).unwrap_err().to_string();
    for needle in [
        "2 tokens only in the teacher's, 2 only in the student's",
        "\"<|im_start|>\" (teacher 257, student none)",
        "\"<|a|>\" (teacher none, student 257)",
        "\"<|im_end|>\" (teacher 258, student none)",
        "\"<|b|>\" (teacher none, student 258)",
        "cross-tokenizer distillation is not supported",
    ] {
        assert!(e.contains(needle), "{needle:?} not in: {e}");
    }
}

#[test]
fn chat_templates_are_compared() {
    let t = tiny(TOKENS, 15, byte_level());
    let mut tok = byte_level();
    tok.chat_template = Some("{{ messages[0]['content'] }}".into());
    let (r, _) = compare(&t, &tiny(TOKENS, 16, tok)).unwrap();
    assert_eq!(r.templates, Templates::Different);
    assert!(
        r.summary().contains("chat templates differ"),
        "{}",
        r.summary()
    );
    let mut tok = byte_level();
    tok.chat_template = None;
    let (r, _) = compare(&t, &tiny(TOKENS, 17, tok)).unwrap();
    assert_eq!(r.templates, Templates::TeacherOnly);
}

// ---------------------------------------------------------------- the command line

/// A folder with `teacher/` (264 rows), `student/` (259), `swapped/` (a and b exchanged),
/// `other/` (other special tokens) and text.
fn folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tiny(264, 21, byte_level())
        .save_hf(&dir.path().join("teacher"))
        .unwrap();
    tiny(TOKENS, 22, byte_level())
        .save_hf(&dir.path().join("student"))
        .unwrap();
    tiny(TOKENS, 23, swapped())
        .save_hf(&dir.path().join("swapped"))
        .unwrap();
    let other = Tokenizer::byte_level(&["<|endoftext|>", "<|a|>", "<|b|>"]).unwrap();
    tiny(TOKENS, 24, other)
        .save_hf(&dir.path().join("other"))
        .unwrap();
    std::fs::write(dir.path().join("train.txt"), TEXT.repeat(30)).unwrap();
    dir
}

fn stdout_ok(args: &[&str]) -> String {
    let out = distill(args);
    assert!(
        out.status.success(),
        "distill {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn distill_check_reports_padding_remaps_and_refusals() {
    let dir = folder();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let out = stdout_ok(&[
        "check",
        &p("teacher"),
        &p("student"),
        "--data",
        &p("train.txt"),
        "--sequences",
        "3",
        "--seq-len",
        "16",
    ]);
    assert!(out.contains("264 embedding rows, 5 padding rows"), "{out}");
    assert!(out.contains("259 embedding rows, 0 padding rows"), "{out}");
    assert!(out.contains("over 48 positions"), "3 windows of 16: {out}");
    // the pair's summary, before the headroom table
    let last = out.lines().find(|l| l.starts_with("vocabulary:")).unwrap();
    assert!(
        last.starts_with(
            "vocabulary: identical tokenizers (259 tokens); rows teacher 264 (5 padding)"
        ) && last.contains("teacher mass on its padding rows mean"),
        "{last}"
    );
    // the reverse pair: nothing to measure
    let out = stdout_ok(&[
        "check",
        &p("student"),
        &p("teacher"),
        "--data",
        &p("train.txt"),
    ]);
    assert!(
        out.contains("none to measure (the teacher has no padding rows)"),
        "{out}"
    );
    assert!(out.contains("student 264 (5 padding)"), "{out}");
    // a remap
    let out = stdout_ok(&["check", &p("student"), &p("swapped")]);
    assert!(out.contains("2 at other ids (remapped)"), "{out}");
    assert!(out.contains("\"b\" (teacher 98 → student 97)"), "{out}");
    // a refusal: exit 2, one line
    let out = distill(&["check", &p("student"), &p("other")]);
    assert_clean_failure(
        &out,
        &[
            "differs from the teacher's",
            "\"<|a|>\" (teacher none, student 257)",
        ],
    );
}

#[test]
fn distill_check_reports_each_teachers_headroom_and_warns_on_none() {
    let dir = folder();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    // the student itself as a second teacher: no headroom at all
    let out = stdout_ok(&[
        "check",
        &p("teacher"),
        &p("student"),
        "--teacher",
        &p("student"),
        "--data",
        &p("train.txt"),
        "--sequences",
        "3",
        "--seq-len",
        "16",
    ]);
    assert!(
        out.contains("headroom over the student on 3 windows of 16 tokens"),
        "{out}"
    );
    let row = |who: &str| -> Vec<f64> {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("  {}: teacher ppl", p(who))))
            .unwrap_or_else(|| panic!("no row for {who}: {out}"));
        line.split([',', ':'])
            .filter_map(|x| x.split_whitespace().last()?.parse::<f64>().ok())
            .collect()
    };
    // [teacher ppl, student ppl, KL, top-1]
    let (t, s) = (row("teacher"), row("student"));
    assert_eq!((t.len(), s.len()), (4, 4), "{out}");
    assert_eq!(
        t[1], s[1],
        "the student's perplexity is the same in every row"
    );
    assert_eq!(
        s[0], s[1],
        "a teacher equal to the student has its perplexity"
    );
    assert!(s[2].abs() < 1e-4 && s[3] == 1.0, "KL 0, top-1 1: {out}");
    assert!(t[0].is_finite() && t[2] >= 0.0, "{out}");
    // the student's perplexity, recomputed in f64 from its logits on the same windows
    let student = distill::model::load(&dir.path().join("student"), tch::Device::Cpu).unwrap();
    let tok = student.tokenizer.as_ref().unwrap();
    let ids = tok
        .encode(
            &std::fs::read_to_string(dir.path().join("train.txt")).unwrap(),
            true,
        )
        .unwrap();
    let (mut nll, mut n, mut big) = (0.0f64, 0usize, 0.0f64);
    for w in ids.chunks_exact(16).take(3) {
        let x =
            tch::Tensor::from_slice(&w.iter().map(|&i| i as i64).collect::<Vec<_>>()).unsqueeze(0);
        let logits = tch::no_grad(|| student.model.forward(&x).unwrap());
        let v = logits.size()[2] as usize;
        let l = Vec::<f64>::try_from(&logits.to_kind(tch::Kind::Double).flatten(0, -1)).unwrap();
        for t in 0..15 {
            let row = &l[t * v..(t + 1) * v];
            let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z = m + row.iter().map(|a| (a - m).exp()).sum::<f64>().ln();
            nll += z - row[w[t + 1] as usize];
            big = row.iter().fold(big, |b, x| b.max(x.abs()));
            n += 1;
        }
    }
    let want = (nll / n as f64).exp();
    // printed to 2 decimals; the f32 log-softmax shifts the mean NLL by at most a few
    // ε·(max |logit| + ln V), the perplexity by that factor
    let rel = (8.0 * f32::EPSILON as f64 * (big + 259f64.ln())).exp() - 1.0;
    assert!(
        (s[1] - want).abs() <= 0.005 + want * rel,
        "{} vs {want} (rel {rel})",
        s[1]
    );
    let warning = format!("warning: {} is no better than the student", p("student"));
    assert!(out.contains(&warning), "{out}");
    assert_eq!(
        out.matches("is no better than the student").count(),
        1 + (t[0] >= t[1]) as usize
    );
}

#[test]
fn a_short_run_on_the_padded_pair_records_the_summary() {
    let dir = folder();
    let run = r#"
[teacher]
path = "teacher"
[student]
path = "student"
[data]
train = "train.txt"
seq_len = 16
[[loss]]
kind = "forward_kl"
[optim]
micro_batch = 2
[run]
steps = 2
threads = 1
output = "out"
"#;
    std::fs::write(dir.path().join("run.toml"), run).unwrap();
    let out = distill(&["train", dir.path().join("run.toml").to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("vocabulary: identical tokenizers"),
        "printed: {stderr}"
    );
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/run.json")).unwrap())
            .unwrap();
    let summary = info["vocab"]["summary"].as_str().unwrap();
    assert!(
        summary.contains("rows teacher 264 (5 padding), student 259 (0 padding)")
            && summary.contains("teacher mass on its padding rows"),
        "{summary}"
    );
    assert_eq!(info["vocab"]["check"]["teacher_padding_rows"], 5);
    let mass = info["vocab"]["check"]["teacher_padding_mass"]["mean"]
        .as_f64()
        .unwrap();
    assert!(mass > 0.0 && mass < 1.0, "{mass}");
    let report = std::fs::read_to_string(dir.path().join("out/report.md")).unwrap();
    assert!(report.contains(summary), "{report}");
    let recs = distill::report::read_metrics(&dir.path().join("out/metrics.jsonl")).unwrap();
    assert!(recs
        .iter()
        .filter(|r| r["kind"] == "train")
        .all(|r| r["loss"].as_f64().is_some_and(f64::is_finite)));
}
