//! A training run over several processes (data parallel, src/dist/): what the trainer does
//! differently when `WORLD_SIZE` > 1.
//!   - every rank loads the same models and data and draws the same global micro-batch of
//!     `micro_batch × WORLD_SIZE` rows; rank r trains on its share (dist::data_parallel::share),
//!     its backward scaled by its share of the global micro-batch's weight, so that the gradients'
//!     sum is the one-process micro-batch's gradient;
//!   - after the step's micro-batches the gradients are summed across ranks (in buckets); every rank
//!     then clips and steps identically; the logged loss, its terms, the token count and whether
//!     the step was finite are summed (or and-ed) in one more collective;
//!   - at the start, parameters and AdamW's moments are broadcast from rank 0, after every rank has
//!     checked that it starts at the same step;
//!   - evaluation is sharded (each rank its share of the validation sequences, each source's too)
//!     and its sums reduced: every rank holds the same metrics, so DDK's weights agree;
//!   - only rank 0 holds the output folder: it writes run.json, metrics, checkpoints and the student.
//!     A resume reads the checkpoint on every rank, so several machines need a shared output folder.
//!
//! The checkpoint's data position is the global one: a run saved at one world size resumes at
//! another with the same global micro-batch (`micro_batch × WORLD_SIZE`, what the fingerprint
//! records as `optim.micro_batch`).
use crate::config::RunConfig;
use crate::data::Sequence;
use crate::dist::{data_parallel, ReduceOp, World};
use crate::eval::MetricSums;
use crate::train::optim::AdamW;
use crate::{Error, Result};

/// Meet the other ranks when the environment names several (torchrun's variables); the run's
/// device becomes this rank's (cuda:LOCAL_RANK for CUDA).
pub fn join(cfg: &mut RunConfig) -> Result<World> {
    let Some(env) = crate::dist::world::WorldEnv::from_env()? else {
        return Ok(World::single());
    };
    refuse_unsupported(cfg, env.world)?;
    cfg.run.device = World::device_for(&env, cfg.run.device);
    World::join(&env, cfg.run.device)
}

/// What a run over several processes cannot do yet, refused before anything is loaded.
pub fn refuse_unsupported(cfg: &RunConfig, world: usize) -> Result<()> {
    let mut no = Vec::new();
    if cfg.onpolicy.is_some() {
        no.push("[onpolicy] (each rank would sample its own continuations)");
    }
    if cfg.paced.is_some() {
        no.push("[paced]");
    }
    if cfg.teacher.budget.is_some() {
        no.push("[teacher] budget");
    }
    if cfg.student.stages.is_some() {
        no.push("[[student.stage]]");
    }
    if cfg.run.max_memory.is_some() {
        no.push("[run] max_memory (the plan probes one process; `distill plan` with one process's micro_batch predicts a rank)");
    }
    if cfg.teachers.is_some() {
        no.push("[[teacher]] (several teachers: their shares would be one rank's)");
    }
    if cfg.teacher.write_back {
        no.push("[teacher] write_back (every rank would write to the store)");
    }
    if no.is_empty() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "a run over {world} processes (WORLD_SIZE) does not support yet: {}; run it as one process",
        no.join(", ")
    )))
}

/// The objective must be a weighted mean over positions for the ranks' shares to add up.
pub fn check_objective(objective: &crate::objective::Objective, world: usize) -> Result<()> {
    if world > 1 && !objective.chunkable() {
        return Err(Error::Invalid(format!(
            "a run over {world} processes needs an objective that is a weighted mean over positions; {} couples the rows of a micro-batch",
            objective.names().join(" + ")
        )));
    }
    Ok(())
}

/// The optimizer's parameters (the same storage).
fn shallow(opt: &AdamW) -> Vec<tch::Tensor> {
    opt.params()
        .into_iter()
        .map(|p| p.shallow_clone())
        .collect()
}

/// Every rank must start at the same step (a resume on a machine that cannot see the checkpoint
/// would start over): one error otherwise.
pub fn agree_on_start(world: &World, step: usize) -> Result<()> {
    let Some(pg) = &world.group else {
        return Ok(());
    };
    let r = pg.all_reduce_f64(
        &[step as f64, -(step as f64)],
        ReduceOp::Max,
        "the start step",
    )?;
    let (max, min) = (r[0], -r[1]);
    if max != min {
        return Err(Error::Invalid(format!(
            "rank {}: the ranks start at different steps ({min} to {max}); every rank must see the same output folder (on several machines, a shared one)",
            world.rank
        )));
    }
    Ok(())
}

/// Rank 0's parameters and optimizer moments on every rank.
pub fn broadcast_start(world: &World, opt: &AdamW) -> Result<()> {
    let Some(pg) = &world.group else {
        return Ok(());
    };
    data_parallel::broadcast_from_main(pg, &shallow(opt), "the parameters")?;
    let moments: Vec<tch::Tensor> = opt.state_tensors().into_iter().map(|(_, t)| t).collect();
    data_parallel::broadcast_from_main(pg, &moments, "the optimizer moments")
}

/// The rows one rank draws for a micro-batch (all ranks draw the global one and keep their share)
/// and the factor on its backward: its share of the global micro-batch's weight, times the world
/// size undone by nothing (the gradients are summed, not averaged).
pub fn my_rows(world: &World, seqs: &[Sequence], global: &[usize]) -> Result<(Vec<usize>, f64)> {
    if world.size == 1 {
        return Ok((global.to_vec(), 1.0));
    }
    let mine = data_parallel::share(global, world.rank, world.size)?;
    let weight = |rows: &[usize]| -> f64 {
        rows.iter()
            .map(|&r| seqs[r].weights.iter().map(|&w| w as f64).sum::<f64>())
            .sum()
    };
    let total = weight(global);
    let factor = if total > 0.0 {
        weight(mine) / total
    } else {
        0.0
    };
    Ok((mine.to_vec(), factor))
}

/// A step's values after the reduction across ranks.
pub struct Reduced {
    pub loss: f64,
    pub parts: Vec<f64>,
    pub tokens: usize,
    pub finite: bool,
    /// seconds in the gradients' all-reduce (None for one process)
    pub all_reduce_seconds: Option<f64>,
}

/// After a step's micro-batches: the gradients summed across ranks, and the step's logged values
/// (loss, terms, tokens) summed and its finiteness and-ed.
pub fn reduce_step(
    world: &World,
    opt: &AdamW,
    loss: f64,
    parts: &[f64],
    tokens: usize,
    finite: bool,
) -> Result<Reduced> {
    let Some(pg) = &world.group else {
        return Ok(Reduced {
            loss,
            parts: parts.to_vec(),
            tokens,
            finite,
            all_reduce_seconds: None,
        });
    };
    let t = std::time::Instant::now();
    data_parallel::all_reduce_gradients(pg, &shallow(opt))?;
    let seconds = t.elapsed().as_secs_f64();
    // a non-finite rank's loss is not summed (it skipped its value), its flag is
    let mut v = vec![
        if finite { loss } else { 0.0 },
        tokens as f64,
        !finite as u8 as f64,
    ];
    v.extend(parts);
    let r = pg.all_reduce_f64(&v, ReduceOp::Sum, "the step's values")?;
    Ok(Reduced {
        loss: r[0],
        parts: r[3..].to_vec(),
        tokens: r[1].round() as usize,
        finite: r[2] == 0.0,
        all_reduce_seconds: Some(seconds),
    })
}

/// The rows of `n` validation sequences one rank evaluates (contiguous, the first ranks one more
/// when `n` does not divide).
pub fn eval_rows(world: &World, n: usize) -> std::ops::Range<usize> {
    let (q, r) = (n / world.size, n % world.size);
    let start = world.rank * q + world.rank.min(r);
    start..start + q + usize::from(world.rank < r)
}

/// An evaluation's sums over every rank's share.
pub fn reduce_sums(world: &World, s: MetricSums) -> Result<MetricSums> {
    let Some(pg) = &world.group else {
        return Ok(s);
    };
    let r = pg.all_reduce_f64(&s.to_vec(), ReduceOp::Sum, "the evaluation's sums")?;
    Ok(MetricSums::from_slice(&r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluation_rows_cover_the_sequences_once() {
        for n in [0, 1, 5, 16, 17] {
            for size in [1, 2, 3, 4] {
                let mut all = vec![];
                for rank in 0..size {
                    let w = World {
                        rank,
                        size,
                        local_rank: rank,
                        group: None,
                    };
                    all.extend(eval_rows(&w, n));
                }
                assert_eq!(all, (0..n).collect::<Vec<_>>(), "n {n} size {size}");
            }
        }
    }
}
