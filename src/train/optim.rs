//! AdamW (Loshchilov & Hutter 2019), in PyTorch's order of operations:
//!   θ ← θ·(1 − lr·λ);  m ← lerp(m, g, 1 − β1);  v ← β2·v + (1 − β2)·g²
//!   θ ← θ − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)
//! Weight decay applies to every parameter (as `torch.optim.AdamW` with one group), the projections
//! of hidden-state terms included (`add`).
//! Schedules: linear warm-up from 0 over `warmup_steps`, then constant, linear or cosine decay to
//! `min_lr_ratio`·lr at the last step. Clipping: the global L2 norm, scaled by
//! max_norm / (norm + 1e−6) when above (`torch.nn.utils.clip_grad_norm_`).
use crate::config::{issue, Checked};
use crate::Result;
use serde::Deserialize;
use std::collections::HashMap;
use tch::{nn, Kind, Tensor};

/// `[optim]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimFile {
    pub lr: Option<f64>,
    pub betas: Option<[f64; 2]>,
    pub eps: Option<f64>,
    pub weight_decay: Option<f64>,
    pub warmup_steps: Option<usize>,
    pub schedule: Option<String>,
    pub min_lr_ratio: Option<f64>,
    pub grad_clip: Option<f64>,
    pub grad_accum: Option<usize>,
    pub micro_batch: Option<usize>,
    /// positions per chunk of the vocabulary-sized objective (0 = all at once)
    pub loss_chunk: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OptimConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub min_lr_ratio: f64,
    /// None = no clipping
    pub grad_clip: Option<f64>,
    pub grad_accum: usize,
    pub micro_batch: usize,
    /// 0 = whole tensors
    pub loss_chunk: usize,
}

/// Bound on micro_batch, grad_accum and loss_chunk: far above any use, low enough that products of
/// them cannot overflow.
const MAX_COUNT: usize = 1 << 24;

impl OptimFile {
    pub fn resolve(&self) -> Checked<OptimConfig> {
        let schedule = match self.schedule.as_deref().unwrap_or("cosine") {
            "cosine" => Schedule::Cosine,
            "linear" => Schedule::Linear,
            "constant" => Schedule::Constant,
            other => {
                return Err(issue(
                    "optim.schedule",
                    format!("'{other}' is not one of cosine, linear, constant"),
                ))
            }
        };
        let positive = |key: &str, v: f64| -> Checked<f64> {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(issue(key, format!("must be positive, got {v}")))
            }
        };
        let lr = positive("optim.lr", self.lr.unwrap_or(1e-4))?;
        let eps = positive("optim.eps", self.eps.unwrap_or(1e-8))?;
        let betas = self.betas.unwrap_or([0.9, 0.999]);
        for b in betas {
            if !(0.0..1.0).contains(&b) {
                return Err(issue("optim.betas", format!("{b} is not in [0, 1)")));
            }
        }
        let weight_decay = self.weight_decay.unwrap_or(0.0);
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(issue(
                "optim.weight_decay",
                format!("must be ≥ 0, got {weight_decay}"),
            ));
        }
        let min_lr_ratio = self.min_lr_ratio.unwrap_or(0.1);
        if !(0.0..=1.0).contains(&min_lr_ratio) {
            return Err(issue(
                "optim.min_lr_ratio",
                format!("must be in [0, 1], got {min_lr_ratio}"),
            ));
        }
        let grad_clip = match self.grad_clip {
            None => Some(1.0),
            Some(0.0) => None,
            Some(c) if c.is_finite() && c > 0.0 => Some(c),
            Some(c) => {
                return Err(issue(
                    "optim.grad_clip",
                    format!("must be positive, or 0 for no clipping, got {c}"),
                ))
            }
        };
        let count = |key: &str, v: usize, zero_ok: bool| -> Checked<usize> {
            if (v == 0 && !zero_ok) || v > MAX_COUNT {
                Err(issue(
                    key,
                    format!(
                        "must be in [{}, {MAX_COUNT}], got {v}",
                        if zero_ok { 0 } else { 1 }
                    ),
                ))
            } else {
                Ok(v)
            }
        };
        Ok(OptimConfig {
            lr,
            betas: (betas[0], betas[1]),
            eps,
            weight_decay,
            warmup_steps: self.warmup_steps.unwrap_or(0),
            schedule,
            min_lr_ratio,
            grad_clip,
            grad_accum: count("optim.grad_accum", self.grad_accum.unwrap_or(1), false)?,
            micro_batch: count("optim.micro_batch", self.micro_batch.unwrap_or(4), false)?,
            loss_chunk: count("optim.loss_chunk", self.loss_chunk.unwrap_or(512), true)?,
        })
    }
}

pub struct AdamW {
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// optimizer steps taken (t in the bias corrections)
    pub t: usize,
    cfg: OptimConfig,
}

impl AdamW {
    pub fn new(vs: &nn::VarStore, cfg: &OptimConfig) -> Result<Self> {
        let mut params: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let m = params
            .iter()
            .map(|(_, p)| p.f_zeros_like())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let v = params
            .iter()
            .map(|(_, p)| p.f_zeros_like())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(AdamW {
            params,
            m,
            v,
            t: 0,
            cfg: cfg.clone(),
        })
    }

    /// Add the trainable variables of a second store (a hidden-state term's projection) to the
    /// same group: one learning rate, one clipping norm over all, one state file. Names must not
    /// collide with those already held.
    pub fn add(&mut self, vs: &nn::VarStore) -> Result<()> {
        let mut more: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        more.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, p) in more {
            if self.params.iter().any(|(n, _)| *n == name) {
                return Err(crate::Error::Invalid(format!(
                    "optimizer: a second parameter named '{name}'"
                )));
            }
            self.m.push(p.f_zeros_like()?);
            self.v.push(p.f_zeros_like()?);
            self.params.push((name, p));
        }
        Ok(())
    }

    /// The trained tensors, in the optimizer's order.
    pub fn params(&self) -> Vec<&Tensor> {
        self.params.iter().map(|(_, p)| p).collect()
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// Global L2 norm of the gradients (0 for parameters without one): the squares summed on the
    /// device, one host read for the whole model.
    pub fn grad_norm(&self) -> Result<f64> {
        let mut squares = Vec::with_capacity(self.params.len());
        for (_, p) in &self.params {
            let g = p.grad();
            if g.defined() {
                squares.push(g.f_square()?.f_sum(Kind::Double)?);
            }
        }
        if squares.is_empty() {
            return Ok(0.0);
        }
        Ok(Tensor::f_stack(&squares, 0)?
            .f_sum(Kind::Double)?
            .f_double_value(&[])?
            .sqrt())
    }

    /// Scale gradients so that their global norm is at most `max_norm`; returns the norm before.
    pub fn clip(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.grad_norm()?;
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            tch::no_grad(|| -> Result<()> {
                for (_, p) in &self.params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.f_mul_scalar_(coef)?;
                    }
                }
                Ok(())
            })?;
        }
        Ok(norm)
    }

    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = self.cfg.betas;
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        let step_size = lr / bc1;
        tch::no_grad(|| -> Result<()> {
            for (i, (_, p)) in self.params.iter_mut().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                if self.cfg.weight_decay != 0.0 {
                    let _ = p.f_mul_scalar_(1.0 - lr * self.cfg.weight_decay)?;
                }
                let _ = self.m[i].f_lerp_(&g, 1.0 - b1)?;
                // v ← β2·v + (1−β2)·g²  (one temporary: g²)
                let _ = self.v[i].f_lerp_(&g.f_square()?, 1.0 - b2)?;
                // θ ← θ + m / d with d = −(√v/√bc2 + ε)/step_size, built in place on one temporary
                let mut denom = self.v[i].f_sqrt()?;
                let _ = denom.f_div_scalar_(bc2.sqrt())?;
                let _ = denom.f_add_scalar_(self.cfg.eps)?;
                let _ = denom.f_mul_scalar_(-1.0 / step_size)?;
                let _ = p.f_addcdiv_(&self.m[i], &denom)?;
            }
            Ok(())
        })
    }

    /// Moments by name ("m.<param>", "v.<param>") for the checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("m.{name}"), self.m[i].shallow_clone()));
            out.push((format!("v.{name}"), self.v[i].shallow_clone()));
        }
        out
    }

    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        t: usize,
        source: &std::path::Path,
    ) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for (i, (name, _)) in self.params.iter().enumerate() {
                for (prefix, dst) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                    let key = format!("{prefix}.{name}");
                    let src = tensors.get(&key).ok_or_else(|| {
                        crate::Error::format(source, format!("missing optimizer tensor '{key}'"))
                    })?;
                    dst.f_copy_(src)?;
                }
            }
            Ok(())
        })?;
        self.t = t;
        Ok(())
    }
}

/// The learning rate at optimizer step `step` (1-based) of `total`.
pub fn lr_at(cfg: &OptimConfig, step: usize, total: usize) -> f64 {
    if cfg.warmup_steps > 0 && step <= cfg.warmup_steps {
        return cfg.lr * step as f64 / cfg.warmup_steps as f64;
    }
    let span = total.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let progress = ((step - cfg.warmup_steps.min(step)) as f64 / span).clamp(0.0, 1.0);
    let min = cfg.min_lr_ratio;
    let factor = match cfg.schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => 1.0 - (1.0 - min) * progress,
        Schedule::Cosine => {
            min + (1.0 - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    };
    cfg.lr * factor
}
