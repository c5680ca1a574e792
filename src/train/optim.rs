//! AdamW (Loshchilov & Hutter 2019), in PyTorch's order of operations:
//!   θ ← θ·(1 − lr·λ);  m ← lerp(m, g, 1 − β1);  v ← β2·v + (1 − β2)·g²
//!   θ ← θ − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)
//! Weight decay applies to every parameter (as `torch.optim.AdamW` with one group).
//! Schedules: linear warm-up from 0 over `warmup_steps`, then constant, linear or cosine decay to
//! `min_lr_ratio`·lr at the last step. Clipping: the global L2 norm, scaled by
//! max_norm / (norm + 1e−6) when above (`torch.nn.utils.clip_grad_norm_`).
use crate::config::{OptimConfig, Schedule};
use crate::Result;
use std::collections::HashMap;
use tch::{nn, Kind, Tensor};

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

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// Global L2 norm of the gradients (0 for parameters without one).
    pub fn grad_norm(&self) -> Result<f64> {
        let mut sq = 0.0;
        for (_, p) in &self.params {
            let g = p.grad();
            if g.defined() {
                sq += g
                    .f_pow_tensor_scalar(2)?
                    .f_sum(Kind::Double)?
                    .f_double_value(&[])?;
            }
        }
        Ok(sq.sqrt())
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
