//! The demo and the chat recipe run end to end on the real demo assets (shortened through --set).
mod common;
use common::*;

#[test]
fn the_demo_runs_and_reports_before_and_after() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = distill(&[
        "demo",
        "--set",
        "run.steps=2",
        "--set",
        "run.eval_every=0",
        "--set",
        "data.max_train_tokens=20000",
        "--set",
        "data.max_validation_sequences=2",
        "--set",
        &format!("run.output={:?}", out.to_str().unwrap()),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}\n{}",
        stdout,
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("before") && stdout.contains("after"),
        "{stdout}"
    );
    assert!(
        stdout.contains("teacher > What is the capital of France?"),
        "{stdout}"
    );
    assert!(stdout.contains("Paris"), "the teacher's answer: {stdout}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("| before |") && report.contains("| after |"),
        "{report}"
    );
    assert!(
        report.contains("teacher layers [0, 1, 2, 3, 24, 25, 26, 27, 28, 29]"),
        "{report}"
    );
    assert!(out.join("student/model.safetensors").exists());
}

#[test]
fn the_chat_recipe_learns_from_conversations() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("chat");
    let recipe = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/chat.toml");
    let teacher = demo_teacher();
    let o = distill(&[
        "train",
        recipe.to_str().unwrap(),
        "--set",
        "run.epochs=0.2",
        "--set",
        "optim.micro_batch=2",
        "--set",
        "optim.grad_accum=1",
        "--set",
        "data.seq_len=96",
        "--set",
        &format!("teacher.path={:?}", teacher.to_str().unwrap()),
        "--set",
        &format!("run.output={:?}", out.to_str().unwrap()),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recs = distill::report::read_metrics(&out.join("metrics.jsonl")).unwrap();
    let train: Vec<_> = recs.iter().filter(|r| r["kind"] == "train").collect();
    assert!(!train.is_empty());
    for r in &train {
        assert!(
            r["skew_kl"].as_f64().unwrap().is_finite()
                && r["cross_entropy"].as_f64().unwrap() > 0.0,
            "{r}"
        );
    }
}
