//! `distill plan RUN.toml [--set k=v …] [--json]`: the run's predicted peak memory and step time on
//! this machine, the terms of the prediction and the chunk chosen for `[run] max_memory`
//! (train/plan.rs). Nothing is written; exit 2 when the run would not fit.
use anyhow::Result;
use distill::config::RunConfig;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    pub run_file: PathBuf,
    /// Override a key of the run file, e.g. --set run.max_memory=4GiB (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the prediction as one JSON object instead of the table
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args, threads: Option<i64>, device: Option<&str>) -> Result<()> {
    let mut cfg = RunConfig::load(&args.run_file, &args.set)?;
    super::train::settle(&mut cfg, threads, device)?;
    let (plan, refused) = match distill::train::plan(&cfg)? {
        Ok(p) => (p, None),
        Err((p, e)) => (p, Some(e)),
    };
    if args.json {
        println!("{}", serde_json::to_string(&plan)?);
    } else {
        print!("{}", plan.table());
    }
    match refused {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
