//! `distill demo`: examples/demo.toml (built in), run like `distill train`, resumed by default;
//! then the same question to teacher and student.
use anyhow::{bail, Result};
use distill::config::RunConfig;
use distill::generate::GenerateOptions;
use std::path::PathBuf;

const DEMO_RUN: &str = include_str!("../../examples/demo.toml");

pub fn run(
    mut set: Vec<String>,
    overwrite: bool,
    threads: Option<i64>,
    device: Option<&str>,
) -> Result<()> {
    // the demo assets may live elsewhere (scripts/setup.sh exports where)
    for (key, var) in [
        ("teacher.path", "DISTILL_DEMO_TEACHER"),
        ("data.train", "DISTILL_DEMO_TEXTS"),
    ] {
        if let Some(v) = std::env::var_os(var) {
            set.insert(0, format!("{key}={:?}", v.to_string_lossy()));
        }
    }
    let here = std::env::current_dir()?;
    let mut cfg = RunConfig::parse(DEMO_RUN, "examples/demo.toml (built in)", &here, &set)?;
    super::train::settle(&mut cfg, threads, device)?;
    let teacher = cfg.teacher.model_path("the demo")?.clone();
    if !teacher.exists() {
        bail!(
            "{}: demo teacher not found; run scripts/setup.sh first",
            teacher.display()
        );
    }
    let opts = distill::train::TrainOptions {
        resume: !overwrite,
        overwrite,
        progress: true,
        run_file: Some(PathBuf::from("examples/demo.toml")),
    };
    println!(
        "distilling {} into 10 of its 30 layers (output: {})",
        teacher.display(),
        cfg.run.output.display()
    );
    super::train::print_summary(&distill::train::train(&cfg, &opts)?);
    let q = "What is the capital of France?";
    for (who, path) in [
        ("teacher", teacher.clone()),
        ("student", cfg.run.output.join("student")),
    ] {
        println!("\n{who} > {q}");
        let m = super::load(&path, cfg.run.device)?;
        let opts = GenerateOptions {
            max_new_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_ids: super::generate::stop_ids(&m),
        };
        super::generate::answer(&m, q, true, None, &opts)?;
    }
    Ok(())
}
