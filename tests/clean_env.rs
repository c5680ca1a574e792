//! The binary runs from a clean environment: no LD_LIBRARY_PATH, no venv on the PATH, no variable
//! of scripts/setup.sh. It finds libtorch through the rpath that build.rs gives it.
use distill::model::{self, LlamaConfig};
use std::path::Path;
use std::process::{Command, Output};
use tch::Device;

/// Run `program` with only HOME and PATH=/usr/bin:/bin in its environment.
fn run_clean(program: &Path, args: &[&str]) -> Output {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
    Command::new(program)
        .args(args)
        .env_clear()
        .env("HOME", home)
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("distill starts")
}

fn assert_success(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// `--help`, and `inspect` on a tiny saved model (libtorch is loaded and used: the model's
/// safetensors are read into tensors and counted). Returns both outputs.
fn check_runs_clean(program: &Path) -> (String, String) {
    let help = assert_success(&run_clean(program, &["--help"]), "--help");
    assert!(help.contains("Usage: distill"), "{help}");

    let cfg = LlamaConfig::tiny(64, 32, 2, 4, 2);
    let m = model::random(&cfg, Device::Cpu, 1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    m.save_hf(&dir).unwrap();
    let out = run_clean(program, &["inspect", dir.to_str().unwrap()]);
    let text = assert_success(&out, "inspect");
    for line in [
        "architecture:   llama (LlamaForCausalLM)".to_string(),
        format!("parameters:     {} ", cfg.num_params()),
        "layers:         2".to_string(),
        "vocab:          64".to_string(),
    ] {
        assert!(text.contains(&line), "no {line:?} in:\n{text}");
    }
    // the temporary folder's name differs between calls
    let text = text.replace(dir.to_str().unwrap(), "MODEL");
    (help, text)
}

#[test]
fn built_binary_runs_in_a_clean_environment() {
    check_runs_clean(Path::new(env!("CARGO_BIN_EXE_distill")));
}

/// This test binary links libtorch too: it starts without LD_LIBRARY_PATH (its own `--list`).
#[test]
fn test_binaries_run_in_a_clean_environment() {
    let me = std::env::current_exe().unwrap();
    let out = run_clean(&me, &["--list"]);
    let list = assert_success(&out, "this test binary --list");
    assert!(
        list.contains("test_binaries_run_in_a_clean_environment"),
        "{list}"
    );
}

/// The command scripts/test.sh installed (`install_distill` in scripts/setup.sh exports its path
/// as DISTILL_INSTALLED) runs clean and answers as the built binary does. Not compared byte for
/// byte: `cargo build` and `cargo test` link two variants of the binary (the dev-dependencies
/// unify some features), and the installed one is `cargo build`'s. A plain `cargo test` installs
/// nothing and has nothing to check here; scripts/test.sh always sets the variable.
#[test]
fn installed_command_runs_clean_like_the_built_binary() {
    let Some(installed) = std::env::var_os("DISTILL_INSTALLED") else {
        eprintln!(
            "DISTILL_INSTALLED not set (not run by scripts/test.sh): nothing installed to check"
        );
        return;
    };
    let theirs = check_runs_clean(Path::new(&installed));
    let ours = check_runs_clean(Path::new(env!("CARGO_BIN_EXE_distill")));
    assert_eq!(theirs, ours, "{installed:?} answers differently");
}
