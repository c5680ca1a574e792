//! `distill launch --nproc N RUN.toml [--resume | --overwrite] [--set k=v …]`: N local processes of
//! `distill train`, each given the variables torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK,
//! MASTER_ADDR = 127.0.0.1, MASTER_PORT = a free port unless --port, DISTILL_DIST_TIMEOUT), and
//! its share of the cores as threads (unless --threads). It waits for all of them; when one fails,
//! the others stop on their own within the timeout (their next collective fails), and any still
//! running after it are killed. The exit status is the first failing rank's.
use anyhow::{bail, Context, Result};
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
    run_file: PathBuf,
    /// Continue from the newest checkpoint in the output folder
    #[arg(long)]
    resume: bool,
    /// Replace a previous run in the output folder
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Override a key of the run file (repeatable), passed to every process
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
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
        c.arg("train").arg(&a.run_file);
        if a.resume {
            c.arg("--resume");
        }
        if a.overwrite {
            c.arg("--overwrite");
        }
        for s in &a.set {
            c.arg("--set").arg(s);
        }
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
            bail!("rank {rank} of {} failed ({s}); resume with `distill launch --nproc {} {} --resume`", a.nproc, a.nproc, a.run_file.display())
        }
    }
}
