//! `distill bench step|losses|matmul`: the measurements of BENCHMARKS.md.
use anyhow::{bail, Context, Result};
use distill::objective::LossTerm;
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Time full distillation steps (teacher forward, student forward and backward, loss, AdamW)
    Step {
        #[arg(long)]
        teacher: PathBuf,
        #[arg(long)]
        student: PathBuf,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 512)]
        seq: usize,
        /// Any loss kind of the run file, with its default parameters
        #[arg(long, default_value = distill::losses::kl::FORWARD_KL.name)]
        loss: String,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Positions per chunk of the objective (default: whole tensors)
        #[arg(long)]
        chunk: Option<usize>,
        /// Train from this teacher store instead of the live teacher: the teacher captures the bench
        /// batch into it (once), is dropped, and the step reads the store
        #[arg(long)]
        store: Option<PathBuf>,
        /// Also write the report as JSON here
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Forward + backward time and memory of each loss of the registry over random logits
    Losses {
        #[arg(long, value_delimiter = ',', default_value = "4,512,49152")]
        shape: Vec<i64>,
        #[arg(long, default_value_t = 2)]
        reps: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The f32 matmul peak of this machine at the current thread count
    Matmul {
        #[arg(long, default_value_t = 1024)]
        n: i64,
    },
}

fn write_json(path: Option<&Path>, v: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    println!("{text}");
    if let Some(p) = path {
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

pub fn run(cmd: BenchCommand, device: tch::Device) -> Result<()> {
    match cmd {
        BenchCommand::Step {
            teacher,
            student,
            batch,
            seq,
            loss,
            steps,
            warmup,
            chunk,
            store,
            json,
        } => {
            let term =
                LossTerm::new(&loss, &[], 1.0).map_err(|m| anyhow::anyhow!("--loss: {m}"))?;
            if batch == 0 || seq < 2 || steps == 0 || chunk == Some(0) {
                bail!("bench step needs --batch ≥ 1, --seq ≥ 2, --steps ≥ 1 and --chunk ≥ 1");
            }
            let mut t = super::load(&teacher, device)?;
            let s = super::load(&student, device)?;
            t.vs.freeze();
            let (_, map) = distill::teacher::vocab::check(&t, &s)?;
            let r = match store {
                None => {
                    let live = distill::teacher::Live::new(&t.model).with_vocab(&map);
                    distill::bench::step(
                        Some(&t),
                        &live,
                        &s,
                        term,
                        batch,
                        seq,
                        steps,
                        warmup,
                        chunk,
                    )?
                }
                Some(dir) => {
                    distill::bench::capture_batch(&t, &dir, batch, seq, map.width())?;
                    drop(t); // no teacher in memory
                    distill::teacher::store::reader::release_freed_memory();
                    let st = distill::teacher::Store::open(&dir)?;
                    let sig = distill::teacher::StoreSignal::new(&st, &map);
                    distill::bench::step(None, &sig, &s, term, batch, seq, steps, warmup, chunk)?
                }
            };
            write_json(json.as_deref(), &r)
        }
        BenchCommand::Losses { shape, reps, .. }
            if shape.len() < 2 || shape.iter().any(|&d| d < 1) || reps == 0 =>
        {
            bail!("bench losses needs a --shape of at least two positive sizes (…, V) and --reps ≥ 1, got {shape:?}")
        }
        BenchCommand::Losses { shape, reps, json } => {
            write_json(json.as_deref(), &distill::bench::losses(&shape, reps)?)
        }
        BenchCommand::Matmul { n } => {
            if !(1..=16384).contains(&n) {
                bail!("--n must be in [1, 16384], got {n}");
            }
            println!(
                "matmul f32 {n}x{n} on {}, {} threads: {:.1} GFLOP/s",
                distill::device::device_name(device),
                tch::get_num_threads(),
                distill::bench::matmul_peak_gflops_on(n, device)
            );
            Ok(())
        }
    }
}
