//! The commands: the argument types (clap) and the dispatch. Each command's work lives in its own
//! file; this one decides the threads (`--threads` > the run file's `threads` > all cores) and the
//! device once, at the top.
mod bench;
mod capture;
mod check;
mod convert;
mod demo;
mod eval;
mod generate;
mod generate_data;
mod inspect;
mod launch;
mod plan;
mod prune;
mod prune_width;
mod rank_students;
mod store;
mod train;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use distill::model::{self, LoadedModel};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "distill",
    version,
    about = "Knowledge distillation for Llama-family causal LMs",
    allow_negative_numbers = true
)]
pub struct Cli {
    /// Intra-op threads for libtorch (default: the run file's run.threads, else all cores)
    #[arg(long, global = true)]
    threads: Option<i64>,
    /// Device: cpu, cuda or cuda:N (default: the run file's run.device, else cpu)
    #[arg(long, global = true)]
    device: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a model (HF folder or .gguf): architecture, sizes, tokenizer
    Inspect { model: PathBuf },
    /// Generate text from a prompt, streaming tokens to stdout
    Generate(generate::Args),
    /// Perplexity of a model over a text file
    Eval(eval::Args),
    /// Convert a model (GGUF or HF folder) into a Hugging Face folder, or into a GGUF file for
    /// llama.cpp when the output ends in .gguf
    Convert {
        model: PathBuf,
        /// A folder (Hugging Face), or a file ending in .gguf
        out_dir: PathBuf,
        /// Keep only these decoder layers (a student made from the model), e.g. 0,3,6,29
        #[arg(long, value_delimiter = ',')]
        layers: Option<Vec<usize>>,
        /// Weight type of a .gguf output (default f16); 1-D tensors stay f32
        #[arg(long = "type", value_enum)]
        ty: Option<convert::GgufType>,
    },
    /// A narrower student (hidden size, MLP size, heads) from a teacher's most important channels
    PruneWidth(prune_width::Args),
    /// Choose a student's layers by how little runs of the teacher's layers change its hidden
    /// state on calibration text, and write the student
    Prune(prune::Args),
    /// Rank untrained candidate students by DisWOT (their relation matrices against the teacher's)
    RankStudents(rank_students::Args),
    /// Compare a teacher's and a student's vocabularies (tokens, padding rows, ids, chat
    /// templates) before any training; exit 2 when they cannot be distilled
    Check(check::Args),
    /// Benchmarks: a distillation step, the loss kernels, the matmul peak
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Distil a teacher into a student as a run file says
    Train {
        run_file: PathBuf,
        /// Continue from the newest checkpoint in the output folder
        #[arg(long)]
        resume: bool,
        /// Replace a previous run in the output folder
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
        /// Override a key of the run file, e.g. --set optim.lr=1e-4 (repeatable)
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Start `distill train` (data parallel over PyTorch's c10d, Gloo on the CPU) or `distill
    /// capture` (`launch --nproc N capture RUN.toml …`) in N local processes, as torchrun would
    Launch(launch::Args),
    /// Predict a run's peak memory and step time on this machine from a short probe, and the
    /// chunk that fits [run] max_memory
    Plan(plan::Args),
    /// Training data from the teacher: it answers a run file's [generate_data] prompts (sampled
    /// across a temperature schedule), and the answers the student is furthest from are kept
    /// (DASD), or it writes rationales for labelled examples (distilling step-by-step)
    GenerateData {
        run_file: PathBuf,
        /// Continue the output file after its last complete batch of prompts
        #[arg(long)]
        resume: bool,
        /// Replace an existing output file
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
        /// Override a key of the run file, e.g. --set generate_data.keep=2 (repeatable)
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Capture the teacher's distribution over a run's data into a teacher store
    Capture(capture::Args),
    /// Inspect or verify a teacher store
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// The demo: examples/demo.toml (SmolLM2-135M into 10 of its layers, on Shakespeare), then a
    /// question to teacher and student
    Demo {
        /// Override a key of the demo's run file, e.g. --set run.steps=20 (repeatable)
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Replace a previous demo run in the output folder (default: continue it)
        #[arg(long)]
        overwrite: bool,
    },
}

/// A usage error from clap as one line (`distill: …`, exit 2); help and version print as usual.
pub fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        _ => {
            let text = e.to_string();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            let first = first.trim().trim_start_matches("error: ");
            eprintln!("distill: {first} (see distill --help)");
            ExitCode::from(2)
        }
    }
}

/// libtorch's intra-op threads: the command line's, else `fallback` (the run file's), else all
/// cores.
fn set_threads(cli: Option<i64>, fallback: Option<usize>) -> Result<()> {
    let n = match (cli, fallback) {
        (Some(n), _) => n,
        (None, Some(n)) => n as i64,
        (None, None) => std::thread::available_parallelism().map_or(1, |n| n.get() as i64),
    };
    if !(1..=4096).contains(&n) {
        bail!("--threads must be in [1, 4096], got {n}");
    }
    tch::set_num_threads(n as i32);
    Ok(())
}

/// The device a command that is not a run uses: --device, else the CPU.
fn device(flag: Option<&str>) -> Result<tch::Device> {
    let d = match flag {
        Some(s) => {
            distill::device::parse_device(s).map_err(|m| anyhow::anyhow!("--device: {m}"))?
        }
        None => tch::Device::Cpu,
    };
    distill::device::check_available(d)?;
    Ok(d)
}

fn load(path: &Path, device: tch::Device) -> Result<LoadedModel> {
    let t = std::time::Instant::now();
    let m = model::load(path, device).context("loading model")?;
    tracing::info!(
        "loaded {} in {:.1}s",
        path.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(m)
}

pub fn run(cli: Cli) -> Result<()> {
    let flag = cli.device.as_deref();
    match cli.command {
        Command::Train {
            run_file,
            resume,
            overwrite,
            set,
        } => train::run(&run_file, resume, overwrite, set, cli.threads, flag),
        Command::GenerateData {
            run_file,
            resume,
            overwrite,
            set,
        } => generate_data::run(&run_file, resume, overwrite, set, cli.threads, flag),
        Command::Demo { set, overwrite } => demo::run(set, overwrite, cli.threads, flag),
        Command::Launch(args) => launch::run(args, cli.threads, flag),
        Command::Capture(args) => capture::run(args, cli.threads, flag),
        Command::Plan(args) => plan::run(args, cli.threads, flag),
        command => {
            set_threads(cli.threads, None)?;
            let device = device(flag)?;
            match command {
                Command::Inspect { model } => inspect::run(&load(&model, device)?),
                Command::Generate(args) => generate::run(args, device),
                Command::Eval(args) => eval::run(args, device),
                Command::Check(args) => check::run(args, device),
                Command::PruneWidth(args) => prune_width::run(args, device),
                Command::Prune(args) => prune::run(args, device),
                Command::RankStudents(args) => rank_students::run(args, device),
                Command::Bench(cmd) => bench::run(cmd, device),
                Command::Store(cmd) => store::run(cmd, device),
                Command::Convert {
                    model,
                    out_dir,
                    layers,
                    ty,
                } => convert::run(&model, &out_dir, layers.as_deref(), ty, device),
                Command::Train { .. }
                | Command::GenerateData { .. }
                | Command::Demo { .. }
                | Command::Launch(_)
                | Command::Capture(_)
                | Command::Plan(_) => {
                    unreachable!("dispatched above")
                }
            }
        }
    }
}
