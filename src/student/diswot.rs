//! DisWOT: ranking untrained students by how closely their sample- and class-relation matrices
//! match the teacher's on calibration text (Dong, Li & Wei, CVPR 2023, "DisWOT: Student
//! Architecture Search for Distillation WithOut Training", §3: a semantic similarity and a relation
//! similarity, summed), adapted from CNN classifiers to causal LMs:
//!
//!   calibration: B windows w_1..w_B of T tokens; for a model M (teacher or student) h^M_{b,t} ∈ R^{d_M}
//!   is the final normed hidden state (the head's input) at token t of window b, and p^M_{b,t} the
//!   softmax of its logits over the shared vocabulary (the first W ids, as the objective compares)
//!   G(X) = rownorm(X·Xᵀ)              each row divided by its L2 norm (a zero row stays zero)
//!   D(G, G') = ‖G − G'‖²_F / n²        for n × n matrices
//!
//!   relation similarity (theirs: the batch similarity of Tung & Mori's similarity-preserving KD, on
//!   the last feature map before pooling): one sample per window, its features the hidden states of
//!   its T tokens laid side by side, a^M_b = (h^M_{b,1}, …, h^M_{b,T}) ∈ R^{T·d_M}, A^M = (a_1; …; a_B):
//!     d_rel = D(G(A^T), G(A^S))        (B × B; entry b, c ∝ Σ_t ⟨h_{b,t}, h_{c,t}⟩)
//!
//!   semantic similarity (theirs: Grad-CAM as the gradient of the cross-entropy with respect to the
//!   classifier's weight, one row per class): every position n = (b, t < T) with label
//!   y_n = w_b[t+1] is one example; the classes c_1..c_K are the K most frequent labels of the
//!   calibration text (ties: the lower id). Row c of ∂(Σ_n CE_n)/∂(head weight) is
//!     e^M_c = Σ_n (p^M_n(c) − [y_n = c])·h^M_n ∈ R^{d_M},    E^M = (e_{c_1}; …; e_{c_K})
//!     d_sem = D(G(E^T), G(E^S))        (K × K)
//!
//!   score = −(d_sem + d_rel)           higher is better; the teacher against itself scores 0, the best
//!
//! Both matrices are B × B or K × K whatever the hidden size, so a narrower student is compared with
//! the teacher as a shallower one is; and both are unchanged when a model's hidden channels are
//! permuted (or rotated), or its features scaled (the relation matrix; the row normalisation).
//!
//! Where this differs from their code (github.com/lliai/DisWOT-CVPR2023, README "Core Code"):
//! - Their semantic metric (`channel_similarity`, ICKD's loss) reads the fc gradient (classes × C)
//!   as one C × 1 map per class and compares, class by class, the C × C products g_c·g_cᵀ — which
//!   needs teacher and student to have the same C. We compare the K × K Gram of the same gradient
//!   rows (how the classes relate), which does not.
//! - They use every class of CIFAR/ImageNet; an LM has ~50k, so the K most frequent next tokens.
//! - They initialise teacher and candidates at random (Gaussian) and score the architecture; we
//!   score the students as distillation would start them (layers or channels of the trained
//!   teacher, or a folder's weights) against the trained teacher.
//! - Their sample is an image with its label; ours a window of tokens with its next tokens.
//!
//! Computed: the forward in the model's dtype, one window at a time (batch 1); everything from the
//! hidden states and logits on in f64 on the CPU. The calibration perplexity exp(mean_n CE_n) is
//! measured on the same positions, for comparison.
use crate::model::Llama;
use crate::{Error, Result};
use serde::Serialize;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// 32 windows of 128 tokens (4,096 tokens, as `distill prune` measures): a relation matrix of
/// 32 × 32 samples (their mini-batches hold 64 images or more), windows long enough to be text.
pub const DEFAULT_SEQUENCES: usize = 32;
pub const DEFAULT_SEQ_LEN: usize = 128;
/// The classes of the semantic matrix: CIFAR-100's count is 100; 64 frequent tokens cover most of
/// the labels of a few thousand tokens of English.
pub const DEFAULT_CLASSES: usize = 64;

/// The `k` most frequent labels (the tokens at positions 1.. of each window), ties broken by the
/// lower id; returned in ascending id order (fewer when the text has fewer distinct labels).
pub fn classes(windows: &[Vec<u32>], k: usize) -> Vec<i64> {
    let mut count: HashMap<u32, usize> = HashMap::new();
    for w in windows {
        for &y in w.iter().skip(1) {
            *count.entry(y).or_default() += 1;
        }
    }
    let mut by: Vec<(u32, usize)> = count.into_iter().collect();
    by.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut c: Vec<i64> = by.iter().take(k).map(|&(id, _)| id as i64).collect();
    c.sort_unstable();
    c
}

/// The windows the ranking measures: all of `seq_len` tokens (a shorter last window, where the
/// text ran out, is dropped), at least two (a relation needs two samples).
pub fn full_windows(mut windows: Vec<Vec<u32>>, seq_len: usize) -> Result<Vec<Vec<u32>>> {
    windows.retain(|w| w.len() == seq_len);
    if windows.len() < 2 {
        return Err(Error::Invalid(format!(
            "the calibration text gives {} window(s) of {seq_len} tokens; the ranking needs at least 2 (more text, or shorter windows)",
            windows.len()
        )));
    }
    Ok(windows)
}

/// G(X) = rownorm(X·Xᵀ) of `x` (n, m), in f64: (n, n).
pub fn relation_matrix(x: &Tensor) -> Result<Tensor> {
    if x.dim() != 2 {
        return Err(Error::Shape(format!(
            "relation_matrix: 'x' has shape {:?}, expected [samples, features]",
            x.size()
        )));
    }
    let x = x.f_to_kind(Kind::Double)?;
    let q = x.f_matmul(&x.f_tr()?)?; // (n, n)
    let norm = q
        .f_norm_scalaropt_dim(2i64, [-1i64].as_slice(), true)?
        .f_clamp_min(f64::MIN_POSITIVE)?; // (n, 1)
    Ok(q.f_div(&norm)?)
}

/// D(G, G') = ‖G − G'‖²_F / n² of two n × n matrices.
pub fn distance(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (sa, sb) = (a.size(), b.size());
    if sa.len() != 2 || sa[0] != sa[1] || sa != sb {
        return Err(Error::Shape(format!(
            "distance: 'a' has shape {sa:?} and 'b' {sb:?}, expected the same [n, n]"
        )));
    }
    let n = sa[0] as f64;
    let d = a
        .f_to_kind(Kind::Double)?
        .f_sub(&b.f_to_kind(Kind::Double)?)?;
    Ok(d.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])? / (n * n))
}

/// What one model shows on the calibration windows.
#[derive(Debug)]
pub struct Measured {
    /// G(A): (B, B) f64 on the CPU
    pub relation: Tensor,
    /// G(E): (K, K) f64 on the CPU
    pub semantic: Tensor,
    /// Σ_n CE_n over the predicted positions (f64)
    pub nll: f64,
    /// the predicted positions: B·(T − 1)
    pub positions: usize,
}

impl Measured {
    /// exp(mean CE) over the predicted positions.
    pub fn ppl(&self) -> f64 {
        (self.nll / self.positions as f64).exp()
    }
}

/// Measure `model` on `windows` (B ≥ 2 windows of the same length T ≥ 2), the semantic matrix over
/// the `classes` (token ids below `width`), probabilities over the first `width` ids.
pub fn measure(
    model: &Llama,
    windows: &[Vec<u32>],
    classes: &[i64],
    width: usize,
) -> Result<Measured> {
    let t = windows.first().map_or(0, Vec::len);
    if windows.len() < 2 || t < 2 || windows.iter().any(|w| w.len() != t) {
        return Err(Error::Invalid(format!(
            "DisWOT needs at least 2 windows of the same length of at least 2 tokens, got lengths {:?}",
            windows.iter().map(Vec::len).collect::<Vec<_>>()
        )));
    }
    let vocab = model.config.vocab_size;
    if width == 0 || width > vocab {
        return Err(Error::Invalid(format!(
            "DisWOT: a vocabulary width of {width} for a model of {vocab} rows"
        )));
    }
    if classes.is_empty() {
        return Err(Error::Invalid("DisWOT: no classes to compare".into()));
    }
    if let Some(&bad) = classes.iter().find(|&&c| c < 0 || c as usize >= width) {
        return Err(Error::Invalid(format!(
            "DisWOT: class {bad} lies outside the shared vocabulary of {width} ids"
        )));
    }
    let cls = Tensor::f_from_slice(classes)?; // (K) on the CPU
    let k = classes.len() as i64;
    let mut e = Tensor::zeros(
        [k, model.config.hidden_size as i64],
        (Kind::Double, Device::Cpu),
    );
    let mut samples = Vec::with_capacity(windows.len());
    let mut nll = 0.0f64;
    tch::no_grad(|| -> Result<()> {
        for w in windows {
            let ids: Vec<i64> = w.iter().map(|&x| x as i64).collect();
            let ids = Tensor::f_from_slice(&ids)?;
            let h = model.forward_hidden(&ids.f_unsqueeze(0)?)?; // (1, T, d)
            let logits = model.head(&h)?.f_narrow(-1, 0, width as i64)?; // (1, T, W)
            let h = h
                .f_squeeze_dim(0)?
                .f_to_kind(Kind::Double)?
                .f_to_device(Device::Cpu)?; // (T, d)
            samples.push(h.f_flatten(0, -1)?); // (T·d)
            let lp = logits
                .f_squeeze_dim(0)?
                .f_narrow(0, 0, t as i64 - 1)?
                .f_to_kind(Kind::Double)?
                .f_to_device(Device::Cpu)?
                .f_log_softmax(-1, Kind::Double)?; // (T−1, W)
            let y = ids.f_narrow(0, 1, t as i64 - 1)?.f_unsqueeze(1)?; // (T−1, 1)
            nll -= lp
                .f_gather(1, &y, false)?
                .f_sum(Kind::Double)?
                .f_double_value(&[])?;
            let onehot = y
                .f_eq_tensor(&cls.f_unsqueeze(0)?)?
                .f_to_kind(Kind::Double)?; // (T−1, K)
            let r = lp.f_index_select(1, &cls)?.f_exp()?.f_sub(&onehot)?; // (T−1, K)
            let hn = h.f_narrow(0, 0, t as i64 - 1)?; // (T−1, d)
            e = e.f_add(&r.f_tr()?.f_matmul(&hn)?)?; // (K, d)
        }
        Ok(())
    })?;
    let a = Tensor::f_stack(&samples, 0)?; // (B, T·d)
    let relation = relation_matrix(&a)?;
    let semantic = relation_matrix(&e)?;
    let finite =
        |x: &Tensor| -> Result<bool> { Ok(x.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0) };
    if !finite(&relation)? || !finite(&semantic)? || !nll.is_finite() {
        return Err(Error::Invalid(
            "the model's hidden states or logits are not finite on the calibration text".into(),
        ));
    }
    Ok(Measured {
        relation,
        semantic,
        nll,
        positions: windows.len() * (t - 1),
    })
}

/// A student's DisWOT score against the teacher, its two terms, and its calibration perplexity.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Score {
    /// −(semantic + relation): higher is better, 0 at best
    pub score: f64,
    /// d_sem
    pub semantic: f64,
    /// d_rel
    pub relation: f64,
    /// the student's exp(mean CE) on the calibration positions
    pub ppl: f64,
}

/// Score `student` against `teacher`, both measured on the same windows and classes.
pub fn score(teacher: &Measured, student: &Measured) -> Result<Score> {
    if teacher.positions != student.positions {
        return Err(Error::Invalid(format!(
            "DisWOT: teacher measured on {} positions, student on {}",
            teacher.positions, student.positions
        )));
    }
    let semantic = distance(&teacher.semantic, &student.semantic)?;
    let relation = distance(&teacher.relation, &student.relation)?;
    Ok(Score {
        score: -(semantic + relation),
        semantic,
        relation,
        ppl: student.ppl(),
    })
}
