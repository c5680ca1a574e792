//! `distill launch --nproc N RUN.toml [--resume | --overwrite] [--set k=v …]`: N local processes of
//! `distill train`; `distill launch --nproc N capture RUN.toml [capture's options]`: N of
//! `distill capture` (`train RUN.toml …` names train explicitly). What follows the run file goes to
//! every process as it is, once checked here as that command would. Each process is given the
//! variables torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK,
//! MASTER_ADDR = 127.0.0.1, MASTER_PORT = a free port unless --port, DISTILL_DIST_TIMEOUT), and
//! its share of the cores as threads (unless --threads). It waits for all of them; when one fails,
//! the others stop on their own within the timeout (their next collective fails), and any still
//! running after it are killed. The exit status is the first failing rank's.
use anyhow::{bail, Context, Result};
use clap::Parser;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Processes to start on this machine
    #[arg(long)]
    nproc: usize,
    /// The rendezvous port (default: a free one)
    #[arg(long)]
    port: Option<u16>,
    /// Seconds a rendezvous or collective may wait before the ranks give up
    #[arg(long, default_value_t = distill::dist::world::DEFAULT_TIMEOUT_S)]
    timeout: f64,
    /// What every process runs: `RUN.toml [--resume | --overwrite] [--set K=V …]` (train), or
    /// `capture RUN.toml [capture's options]`
    #[arg(
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "[capture] RUN.toml [OPTIONS]"
    )]
    command: Vec<OsString>,
}

// What follows `launch`'s own options when it is training (as `distill train` reads it).
#[derive(Parser)]
#[command(
    name = "distill launch --nproc N",
    no_binary_name = true,
    about = "Train in N local processes (data parallel)"
)]
struct TrainArgs {
    run_file: PathBuf,
    /// Continue from the newest checkpoint in the output folder
    #[arg(long)]
    resume: bool,
    /// Replace a previous run in the output folder
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Override a key of the run file (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

// … when it is capturing (as `distill capture` reads it).
#[derive(Parser)]
#[command(
    name = "distill launch --nproc N capture",
    no_binary_name = true,
    about = "Capture a teacher store in N local processes (each its share of the batches)"
)]
struct CaptureArgs {
    #[command(flatten)]
    args: super::capture::Args,
}

/// The command every process runs: its name, its arguments (checked), and the advice after a
/// failure.
fn command(
    words: &[OsString],
    nproc: usize,
) -> Result<Option<(&'static str, &[OsString], String)>> {
    let (name, rest) = match words.first().and_then(|w| w.to_str()) {
        Some("capture") => ("capture", &words[1..]),
        Some("train") => ("train", &words[1..]),
        _ => ("train", words),
    };
    let checked = if name == "capture" {
        CaptureArgs::try_parse_from(rest).map(|c| {
            format!(
                "run it again (with any number of processes) to capture what is missing: `distill launch --nproc {nproc} capture {} …`",
                c.args.run_file.display()
            )
        })
    } else {
        TrainArgs::try_parse_from(rest).map(|t| {
            let _ = (t.resume, t.overwrite, t.set);
            format!(
                "resume with `distill launch --nproc {nproc} {} --resume`",
                t.run_file.display()
            )
        })
    };
    match checked {
        Ok(advice) => Ok(Some((name, rest, advice))),
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return Ok(None);
            }
            let text = e.to_string();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            bail!(
                "launch … {name}: {}",
                first.trim().trim_start_matches("error: ")
            )
        }
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

pub fn run(a: Args, threads: Option<i64>, device: Option<&str>) -> Result<()> {
    if a.nproc == 0 || a.nproc > 1024 {
        bail!("--nproc: must be in [1, 1024], got {}", a.nproc);
    }
    if !(a.timeout > 0.0 && a.timeout <= 86_400.0) {
        bail!("--timeout: seconds in (0, 86400], got {}", a.timeout);
    }
    let Some((name, rest, advice)) = command(&a.command, a.nproc)? else {
        return Ok(()); // help was asked for
    };
    let exe = std::env::current_exe().context("finding the distill executable")?;
    let port = match a.port {
        Some(p) => p,
        None => free_port()?,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = threads.unwrap_or_else(|| (cores / a.nproc).max(1) as i64);
    let mut children: Vec<Child> = Vec::new();
    for rank in 0..a.nproc {
        let mut c = Command::new(&exe);
        c.arg("--threads").arg(threads.to_string());
        if let Some(d) = device {
            c.arg("--device").arg(d);
        }
        c.arg(name).args(rest);
        c.env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", a.nproc.to_string())
            .env("LOCAL_WORLD_SIZE", a.nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("DISTILL_DIST_TIMEOUT", a.timeout.to_string())
            .env_remove("TORCHELASTIC_USE_AGENT_STORE");
        match c.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                for mut ch in children {
                    let _ = ch.kill();
                    let _ = ch.wait();
                }
                return Err(e).with_context(|| format!("starting rank {rank} ({})", exe.display()));
            }
        }
    }
    // wait; after the first failure, give the others the timeout (plus a margin) to stop
    let mut status: Vec<Option<std::process::ExitStatus>> = vec![None; a.nproc];
    let mut first_failure: Option<(usize, std::process::ExitStatus)> = None;
    let mut deadline: Option<Instant> = None;
    while status.iter().any(Option::is_none) {
        for (rank, ch) in children.iter_mut().enumerate() {
            if status[rank].is_none() {
                if let Some(s) = ch.try_wait()? {
                    status[rank] = Some(s);
                    if !s.success() && first_failure.is_none() {
                        first_failure = Some((rank, s));
                        deadline = Some(Instant::now() + Duration::from_secs_f64(a.timeout + 10.0));
                    }
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            for (rank, ch) in children.iter_mut().enumerate() {
                if status[rank].is_none() {
                    eprintln!(
                        "distill launch: rank {rank} still running after the timeout: killed"
                    );
                    let _ = ch.kill();
                    status[rank] = ch.wait().ok();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match first_failure {
        None => Ok(()),
        Some((rank, s)) => {
            bail!("rank {rank} of {} failed ({s}); {advice}", a.nproc)
        }
    }
}
