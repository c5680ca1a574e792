//! The `distill` command line: parses the arguments and hands each command to its file in
//! `src/cli/`; every error is one line (`distill: …`, exit code 2).
mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DISTILL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return cli::usage_error(e),
    };
    // A panic is a bug, but the user still gets one line, not a backtrace.
    std::panic::set_hook(Box::new(|_| {}));
    match std::panic::catch_unwind(|| cli::run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(err)) => {
            eprintln!("distill: {err:#}");
            ExitCode::from(2)
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            // stdout closed by the reader (`distill inspect M | head -1`): stop quietly
            if msg.contains("Broken pipe") {
                return ExitCode::SUCCESS;
            }
            // one line: no C++ frames (they follow a newline, literal or escaped)
            let first = msg
                .split("\\n")
                .next()
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("");
            eprintln!("distill: internal error: {first}");
            ExitCode::from(2)
        }
    }
}
