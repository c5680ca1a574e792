//! Data parallelism over a process group, as PyTorch's DistributedDataParallel does it in spirit:
//! every rank holds the whole student and optimizer, takes its share of every global batch, and the
//! gradients are summed across ranks before the (identical) optimizer step.
//!
//! Exactness: a global micro-batch of n rows is drawn by every rank alike (the sampler is a
//! function of the seed and position); rank r takes rows [r·n/W, (r+1)·n/W). Rank r's objective
//! is the weighted mean over its own positions, L_r = Σ_{t∈r} w_t ℓ_t / W_r with W_r = Σ_{t∈r} w_t,
//! and its backward is scaled by W_r / W (W = Σ_r W_r, the global micro-batch's weight, which every
//! rank computes from the rows themselves). The sum over ranks of the scaled gradients is then
//!   Σ_r (W_r / W) ∇L_r = ∇ Σ_t w_t ℓ_t / W,
//! the gradient of the one-process micro-batch of all n rows: W processes × micro-batch n/W give
//! the weights of 1 process × micro-batch n, up to the order of floating-point sums. That holds for
//! every objective that is a weighted mean over positions; one that couples rows (SinKD's batch
//! cost matrix) is refused with several processes.
//!
//! Gradients are reduced in buckets of at most `BUCKET_BYTES` (parameters in the optimizer's
//! order, flattened into one tensor per bucket), all buckets started before the first is waited
//! for. They are reduced after the micro-batch's backward, not during it: the chunked loss runs
//! several backward passes per micro-batch, and tch exposes no gradient hooks to start a bucket
//! when its last gradient is ready.
use super::c10d::{ProcessGroup, ReduceOp};
use crate::{Error, Result};
use tch::Tensor;

/// The most bytes of gradients one all-reduce carries (PyTorch DDP's default bucket is 25 MiB).
pub const BUCKET_BYTES: usize = 25 << 20;

/// Rank `rank`'s contiguous share of a global micro-batch's rows.
pub fn share(rows: &[usize], rank: usize, world: usize) -> Result<&[usize]> {
    if world == 0 || !rows.len().is_multiple_of(world) || rank >= world {
        return Err(Error::Invalid(format!(
            "a global micro-batch of {} rows does not split evenly over {world} processes",
            rows.len()
        )));
    }
    let n = rows.len() / world;
    Ok(&rows[rank * n..(rank + 1) * n])
}

/// Consecutive tensors grouped into buckets of at most `cap` bytes (a larger tensor alone).
pub fn buckets(sizes: &[usize], cap: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, &b) in sizes.iter().enumerate() {
        if i > start && bytes + b > cap {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += b;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

fn bytes_of(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// The tensors reduced (op) or broadcast from rank 0 in place, through flat buckets of one kind.
fn bucketed(
    pg: &ProcessGroup,
    tensors: &[Tensor],
    what: &str,
    run: &dyn Fn(&mut [Tensor]) -> Result<()>,
) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        let sizes: Vec<usize> = tensors.iter().map(bytes_of).collect();
        let groups = buckets(&sizes, BUCKET_BYTES);
        // one bucket per group and kind (a flat tensor holds one kind)
        let mut flats = Vec::new();
        let mut members = Vec::new();
        for g in groups {
            let mut kinds: Vec<tch::Kind> = Vec::new();
            for i in g.clone() {
                if !kinds.contains(&tensors[i].kind()) {
                    kinds.push(tensors[i].kind());
                }
            }
            for k in kinds {
                let idx: Vec<usize> = g.clone().filter(|&i| tensors[i].kind() == k).collect();
                let parts: Vec<Tensor> = idx
                    .iter()
                    .map(|&i| tensors[i].f_reshape([-1]))
                    .collect::<std::result::Result<_, _>>()?;
                flats.push(Tensor::f_cat(&parts, 0)?);
                members.push(idx);
            }
        }
        run(&mut flats)?;
        for (flat, idx) in flats.iter().zip(&members) {
            let mut at = 0i64;
            for &i in idx {
                let n = tensors[i].numel() as i64;
                let mut dst = tensors[i].shallow_clone();
                dst.f_copy_(&flat.f_narrow(0, at, n)?.f_view_as(&tensors[i])?)?;
                at += n;
            }
        }
        let _ = (pg, what);
        Ok(())
    })
}

/// Every parameter's gradient summed across the ranks (parameters without a gradient are skipped:
/// the same ones on every rank, as the model and objective are the same).
pub fn all_reduce_gradients(pg: &ProcessGroup, params: &[Tensor]) -> Result<()> {
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .collect();
    bucketed(pg, &grads, "gradients", &|flats| {
        pg.all_reduce(flats, ReduceOp::Sum, "the gradients")
    })
}

/// The tensors (parameters, optimizer moments) replaced by rank 0's.
pub fn broadcast_from_main(pg: &ProcessGroup, tensors: &[Tensor], what: &str) -> Result<()> {
    bucketed(pg, tensors, what, &|flats| pg.broadcast(flats, 0, what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_rows_once_in_order() {
        let rows: Vec<usize> = (10..22).collect();
        for world in [1, 2, 3, 4, 6, 12] {
            let joined: Vec<usize> = (0..world)
                .flat_map(|r| share(&rows, r, world).unwrap().to_vec())
                .collect();
            assert_eq!(joined, rows);
        }
        assert!(share(&rows, 0, 5).is_err());
        assert!(share(&rows, 2, 2).is_err());
    }

    #[test]
    fn buckets_respect_the_cap_and_keep_order() {
        assert_eq!(buckets(&[4, 4, 4, 4], 8), vec![0..2, 2..4]);
        assert_eq!(buckets(&[10, 1, 1], 8), vec![0..1, 1..3]);
        assert_eq!(buckets(&[1, 10, 1], 8), vec![0..1, 1..2, 2..3]);
        assert_eq!(buckets(&[], 8), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(buckets(&[3, 3, 3], 9), vec![0..3]);
    }
}
