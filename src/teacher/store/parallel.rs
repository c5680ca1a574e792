//! A capture over several processes (torchrun's variables, or `distill launch --nproc N capture`):
//! the ranks write the shards of one store.
//!   1. every rank loads the teacher and the data and makes the same plan (capture.rs);
//!   2. rank 0 alone opens the store (`StoreWriter::open`: creates or checks store.json, adopts
//!      the part files a killed capture left); the others wait for it in a collective that also
//!      says whether it failed;
//!   3. every rank reads the header and computes the same list of sequences not held; cut into
//!      the batches one process would run (so each sequence meets the same batch-mates and the
//!      teacher's output is the one process's, bit for bit), rank r runs batches r, r + N, r + 2N …
//!      and writes them with a part writer (`StoreWriter::part`: shard-r{r}-NNNNN files listed in
//!      part-{r}.json);
//!   4. a collective sums the counts (and waits for every rank's last shard); rank 0 merges the
//!      part files into store.json and deletes them; a last collective says whether that worked.
//!
//! A rank that stops makes the others fail at their next collective within DISTILL_DIST_TIMEOUT,
//! with one error. The shards each rank finished are listed in its part file; the next capture
//! (any number of processes) adopts them and captures only the rest.
use super::capture::CaptureOptions;
use crate::config::RunConfig;
use crate::dist::{c10d::GONE_HINT, ReduceOp, World};
use crate::{Error, Result};

/// Meet the other ranks when the environment names several; what a capture over several
/// processes does not do is refused first, before any rendezvous.
pub fn join(cfg: &mut RunConfig, opts: &CaptureOptions) -> Result<World> {
    let Some(env) = crate::dist::world::WorldEnv::from_env()? else {
        return Ok(World::single());
    };
    let mut no = Vec::new();
    if opts.compare_forward {
        no.push("--compare-forward (time it in one process)");
    }
    if opts.budget.is_some() || cfg.teacher.budget.is_some() {
        no.push("a teacher-query budget (its selection runs the student over all the data)");
    }
    if !no.is_empty() {
        return Err(Error::Invalid(format!(
            "a capture over {} processes (WORLD_SIZE) does not support {}; capture in one process",
            env.world,
            no.join(", ")
        )));
    }
    cfg.run.device = World::device_for(&env, cfg.run.device);
    World::join(&env, cfg.run.device).map_err(for_capture)
}

/// A failed collective's advice, for a capture.
pub fn for_capture(e: Error) -> Error {
    match e {
        Error::Distributed { rank, op, msg } => Error::Distributed {
            rank,
            op,
            msg: msg.replace(
                GONE_HINT,
                "another rank has stopped or cannot be reached (run the capture again, with any number of processes: it keeps the shards written so far)",
            ),
        },
        e => e,
    }
}

/// Every rank's `result` of a step (`what`): this rank's error if it failed, else one naming the
/// step if another rank's failed (that rank's own error says why), else the value.
pub fn agree<T>(world: &World, result: Result<T>, what: &str) -> Result<T> {
    let Some(pg) = &world.group else {
        return result;
    };
    let failed = pg
        .all_reduce_f64(
            &[result.is_err() as u8 as f64],
            ReduceOp::Max,
            &format!("the outcome of {what}"),
        )
        .map_err(for_capture)?;
    match result {
        Err(e) => Err(e),
        Ok(_) if failed[0] > 0.0 => Err(Error::Invalid(format!(
            "rank {}: {what} failed on another rank (its error says why)",
            world.rank
        ))),
        Ok(v) => Ok(v),
    }
}

/// Whether this rank runs batch `b` (of the batches one process would run, in order).
pub fn runs_batch(world: &World, b: usize) -> bool {
    b % world.size == world.rank
}

/// Counts summed over the ranks, and seconds the largest of them.
pub fn reduce_counts(world: &World, counts: &[usize], seconds: f64) -> Result<(Vec<usize>, f64)> {
    let Some(pg) = &world.group else {
        return Ok((counts.to_vec(), seconds));
    };
    let c: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
    let sum = pg
        .all_reduce_f64(&c, ReduceOp::Sum, "the capture's counts")
        .map_err(for_capture)?;
    let max = pg
        .all_reduce_f64(&[seconds], ReduceOp::Max, "the capture's time")
        .map_err(for_capture)?;
    Ok((sum.iter().map(|&x| x.round() as usize).collect(), max[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_batch_is_run_by_one_rank() {
        for size in 1..5 {
            for b in 0..11 {
                let n = (0..size)
                    .filter(|&rank| {
                        runs_batch(
                            &World {
                                rank,
                                size,
                                local_rank: rank,
                                group: None,
                            },
                            b,
                        )
                    })
                    .count();
                assert_eq!(n, 1, "batch {b}, {size} ranks");
            }
        }
    }
}
