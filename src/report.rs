//! What a run leaves for the user, made from its records alone (`run.json` and the lines of
//! `metrics.jsonl`, one JSON object per logged step, per evaluation and a closing summary):
//! `loss.png` (training and validation curves) and `report.md`. Nothing here knows the trainer.
use crate::io::read_to_string;
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// Read every record of a metrics file.
pub fn read_metrics(path: &Path) -> Result<Vec<Value>> {
    read_to_string(path)?
        .lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::Invalid(format!("{}:{}: {e}", path.display(), i + 1)))
        })
        .collect()
}

fn font() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        for p in [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        ] {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font(
                    "sans-serif",
                    plotters::style::FontStyle::Normal,
                    bytes,
                )
                .is_ok()
                {
                    return true;
                }
            }
        }
        false
    })
}

/// Plot training loss per step (blue) and validation KL(teacher‖student) per evaluation (red).
pub fn plot_loss(metrics: &[Value], out: &Path) -> Result<()> {
    use plotters::prelude::*;
    let train: Vec<(f64, f64)> = metrics
        .iter()
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("train"))
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get("loss")?.as_f64()?)))
        .filter(|(_, y)| y.is_finite())
        .collect();
    let val: Vec<(f64, f64)> = metrics
        .iter()
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("eval"))
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get("kl")?.as_f64()?)))
        .collect();
    let all: Vec<&(f64, f64)> = train.iter().chain(&val).collect();
    if all.is_empty() {
        return Ok(());
    }
    let xmax = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let ymax = all.iter().map(|p| p.1).fold(0.0, f64::max) * 1.05 + 1e-9;
    let with_text = font();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(out, (900, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut b = ChartBuilder::on(&root);
        b.margin(20);
        if with_text {
            b.caption(
                "training loss (blue) and validation KL(teacher||student) (red)",
                ("sans-serif", 20),
            )
            .x_label_area_size(40)
            .y_label_area_size(60);
        }
        let mut chart = b.build_cartesian_2d(0.0..xmax, 0.0..ymax)?;
        if with_text {
            chart.configure_mesh().x_desc("step").draw()?;
        }
        chart.draw_series(LineSeries::new(train.iter().copied(), &BLUE))?;
        chart.draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))?;
        chart.draw_series(val.iter().map(|&p| Circle::new(p, 4, RED.filled())))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| Error::Invalid(format!("{}: plotting failed: {e}", out.display())))
}

/// Plot each source's validation KL(teacher‖student) per evaluation (`[[data.source]]`), one
/// colour per source; nothing when the records have no per-source metrics.
pub fn plot_sources(metrics: &[Value], out: &Path) -> Result<()> {
    use plotters::prelude::*;
    let evals: Vec<&Value> = metrics
        .iter()
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("eval"))
        .filter(|r| r.get("sources").is_some_and(Value::is_object))
        .collect();
    let Some(first) = evals.first() else {
        return Ok(());
    };
    let names: Vec<String> = first["sources"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    let lines: Vec<Vec<(f64, f64)>> = names
        .iter()
        .map(|n| {
            evals
                .iter()
                .filter_map(|r| Some((r["step"].as_f64()?, r["sources"][n]["kl"].as_f64()?)))
                .filter(|(_, y)| y.is_finite())
                .collect()
        })
        .collect();
    let all: Vec<&(f64, f64)> = lines.iter().flatten().collect();
    if all.is_empty() {
        return Ok(());
    }
    let xmax = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let ymax = all.iter().map(|p| p.1).fold(0.0, f64::max) * 1.05 + 1e-9;
    let with_text = font();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(out, (900, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut b = ChartBuilder::on(&root);
        b.margin(20);
        if with_text {
            b.caption(
                "validation KL(teacher||student) per source",
                ("sans-serif", 20),
            )
            .x_label_area_size(40)
            .y_label_area_size(60);
        }
        let mut chart = b.build_cartesian_2d(0.0..xmax, 0.0..ymax)?;
        if with_text {
            chart.configure_mesh().x_desc("step").draw()?;
        }
        for (i, (name, line)) in names.iter().zip(&lines).enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            let series = chart.draw_series(LineSeries::new(
                line.iter().copied(),
                colour.stroke_width(2),
            ))?;
            if with_text {
                series
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
            }
            chart.draw_series(line.iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
        }
        if with_text {
            chart
                .configure_series_labels()
                .background_style(WHITE)
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| Error::Invalid(format!("{}: plotting failed: {e}", out.display())))
}

/// The last record of `kind` ("eval", "summary"), or the eval at `step`.
fn record<'a>(records: &'a [Value], kind: &str, step: Option<u64>) -> Option<&'a Value> {
    records
        .iter()
        .rev()
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some(kind))
        .find(|r| step.is_none_or(|s| r.get("step").and_then(Value::as_u64) == Some(s)))
}

/// The run's summary as Markdown, from run.json (`info`) and the metric records of `dir`'s run.
pub fn markdown(info: &Value, records: &[Value], dir: &Path) -> String {
    let s = |v: &Value| match v {
        Value::String(x) => x.clone(),
        Value::Null => "—".into(),
        other => other.to_string(),
    };
    let f = |v: &Value, digits: usize| {
        v.as_f64()
            .map_or_else(|| "—".to_string(), |x| format!("{x:.digits$}"))
    };
    let (t, st) = (&info["teacher"], &info["student"]);
    let mut o = String::new();
    o += "# distill report\n\n";
    if let Some(r) = info["run_file"].as_str() {
        o += &format!("Run file: `{r}`\n\n");
    }
    o += "## Models\n\n| | teacher | student |\n|---|---|---|\n";
    o += &format!(
        "| source | `{}` | {} |\n",
        s(&t["source"]),
        s(&st["source"])
    );
    o += &format!(
        "| parameters | {:.1}M | {:.1}M |\n",
        t["parameters"].as_f64().unwrap_or(0.0) / 1e6,
        st["parameters"].as_f64().unwrap_or(0.0) / 1e6
    );
    o += &format!("| layers | {} | {} |\n", s(&t["layers"]), s(&st["layers"]));
    o += &format!(
        "| compute dtype | {} | {} |\n",
        s(&t["dtype"]),
        s(&st["dtype"])
    );
    if let Some(sum) = record(records, "summary", None) {
        o += &format!(
            "| forward speed (tokens/s, {}) | {} | {} |\n",
            s(&info["device"]),
            f(&sum["teacher_tokens_per_s"], 0),
            f(&sum["student_tokens_per_s"], 0)
        );
    }
    o += "\n## Data and objective\n\n";
    let d = &info["data"];
    o += &format!(
        "- train: `{}` — {} sequences of {} tokens ({} target tokens)\n- validation: {} sequences\n",
        s(&d["train"]),
        s(&d["train_sequences"]),
        s(&d["seq_len"]),
        s(&d["train_tokens"]),
        s(&d["validation_sequences"])
    );
    let terms: Vec<String> = info["objective"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    o += &format!("- objective: {}\n", terms.join(" + "));
    if let Some(v) = info["vocab"]["summary"].as_str() {
        o += &format!("- {v}\n");
    }
    let op = &info["optim"];
    o += &format!(
        "- AdamW lr {} ({} schedule, {} warm-up steps), micro-batch {} × accumulation {}, {} steps, seed {}\n\n",
        s(&op["lr"]), s(&op["schedule"]), s(&op["warmup_steps"]), s(&op["micro_batch"]), s(&op["grad_accum"]),
        s(&info["total_steps"]), s(&info["seed"])
    );
    o += "## Validation\n\n| | student ppl | teacher ppl | KL(teacher‖student)/token | top-1 agreement |\n|---|---|---|---|---|\n";
    let row = |name: &str, m: &Value| {
        format!(
            "| {name} | {} | {} | {} | {} |\n",
            f(&m["student_ppl"], 3),
            f(&m["teacher_ppl"], 3),
            f(&m["kl"], 4),
            f(&m["top1"], 3)
        )
    };
    if let Some(b) = record(records, "eval", Some(0)) {
        o += &row("before", b);
    }
    if let Some(a) = record(records, "eval", None).filter(|r| r["step"].as_u64() != Some(0)) {
        o += &row("after", a);
    }
    let last = record(records, "eval", None);
    if last.is_some_and(|r| r.get("onpolicy").is_some()) {
        o += "\nOn the student's own continuations of the validation prompts (`[onpolicy]`; the \
              exposure-bias measure: the teacher judging what the student writes):\n\n\
              | | student ppl | teacher ppl | KL(teacher‖student)/token | top-1 agreement |\n|---|---|---|---|---|\n";
        if let Some(b) = record(records, "eval", Some(0)).filter(|r| r.get("onpolicy").is_some()) {
            o += &row("before", &b["onpolicy"]);
        }
        if let Some(a) = last.filter(|r| r["step"].as_u64() != Some(0)) {
            o += &row("after", &a["onpolicy"]);
        }
        if let Some(samples) = last.and_then(|r| r["samples"].as_array()) {
            o += &format!("\nSamples at step {}:\n\n", s(&last.unwrap()["step"]));
            for x in samples {
                o += &format!(
                    "```text\n{}⟨student⟩{}\n```\n\n",
                    s(&x["prompt"]),
                    s(&x["sample"])
                );
            }
        }
    }
    // several sources: each one's validation metrics before and after; DDK's weight updates
    if let Some(after) = last.filter(|r| r.get("sources").is_some()) {
        o += "\nPer source (each source's validation data alone; `[[data.source]]`):\n\n\
              | source | student ppl before → after | teacher ppl | KL/token before → after | top-1 before → after |\n|---|---|---|---|---|\n";
        let before = record(records, "eval", Some(0));
        if let Some(per) = after["sources"].as_object() {
            for (name, a) in per {
                let b = before.map(|b| &b["sources"][name]).unwrap_or(&Value::Null);
                o += &format!(
                    "| {name} | {} → {} | {} | {} → {} | {} → {} |\n",
                    f(&b["student_ppl"], 3),
                    f(&a["student_ppl"], 3),
                    f(&a["teacher_ppl"], 3),
                    f(&b["kl"], 4),
                    f(&a["kl"], 4),
                    f(&b["top1"], 3),
                    f(&a["top1"], 3)
                );
            }
        }
    }
    // several teachers: each one's weight, share of the signal and perplexity, before and after
    if let Some(after) = last.and_then(|r| r["teachers"].as_array()) {
        o += "\nTeachers (`[[teacher]]`; share: the mean over validation target positions of w_i p_i(y) / Σ_j w_j p_j(y)):\n\n\
              | teacher | weight | share before → after | ppl |\n|---|---|---|---|\n";
        let before = record(records, "eval", Some(0)).and_then(|r| r["teachers"].as_array());
        for (i, a) in after.iter().enumerate() {
            let b = before.and_then(|b| b.get(i)).unwrap_or(&Value::Null);
            o += &format!(
                "| {} | {} | {} → {} | {} |\n",
                s(&a["name"]),
                f(&a["weight"], 3),
                f(&b["share"], 3),
                f(&a["share"], 3),
                f(&a["ppl"], 3)
            );
        }
    }
    let ddk: Vec<&Value> = records
        .iter()
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("ddk"))
        .collect();
    if let Some(first) = ddk.first() {
        let names: Vec<String> = first["sources"]
            .as_array()
            .map(|a| a.iter().map(s).collect())
            .unwrap_or_default();
        o += "\n## DDK source weights\n\nEach update: the student/teacher perplexity ratio per \
              source on its validation data, and the sampling weights from that step on (`[data.ddk]`).\n\n| first step |";
        for n in &names {
            o += &format!(" {n}: ratio | {n}: weight |");
        }
        o += "\n|---|";
        o += &"---|---|".repeat(names.len());
        o += "\n";
        for r in &ddk {
            o += &format!("| {} |", s(&r["step"]));
            for i in 0..names.len() {
                o += &format!(
                    " {} | {} |",
                    f(&r["discrepancies"][i], 3),
                    f(&r["weights"][i], 3)
                );
            }
            o += "\n";
        }
    }
    // PACED: each refresh of the pass rates, and the validation pass rate before and after
    let paced: Vec<&Value> = records
        .iter()
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("paced"))
        .collect();
    if !paced.is_empty() {
        o += "\n## PACED pass rates\n\nEach training problem weighted by w(p) = p^α (1 − p)^β of the \
              student's pass rate p over its rollouts (`[paced]`); histogram: problems per number of \
              passing rollouts.\n\n| first step weighted | problems | mean p | histogram | share with w = 0 | uniform fall-back |\n|---|---|---|---|---|---|\n";
        for r in &paced {
            o += &format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                s(&r["step"]),
                s(&r["problems"]),
                f(&r["mean_p"], 3),
                r["histogram"],
                f(&r["zero_weight_share"], 3),
                s(&r["uniform_fallback"])
            );
        }
        let rate = |r: &Value| r.get("paced_pass_rate").map(|v| f(v, 3));
        if let Some(b) = record(records, "eval", Some(0)).and_then(rate) {
            o += &format!("\nValidation pass rate: before {b}");
            if let Some(a) = last
                .filter(|r| r["step"].as_u64() != Some(0))
                .and_then(rate)
            {
                o += &format!(", after {a}");
            }
            o += "\n";
        }
    }
    // a run in stages: a line per stage, the student right after its cut and at its last step
    let stages: Vec<&Value> = records
        .iter()
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("stage"))
        .collect();
    if !stages.is_empty() {
        o += "\n## Stages (progressive pruning)\n\n| stage | steps | layers | removed (teacher layers) | d | after the cut: ppl / KL | at its last step: ppl / KL / top-1 |\n|---|---|---|---|---|---|---|\n";
        for r in stages {
            let count = |v: &Value| v.as_array().map_or(0, Vec::len);
            let end = record(records, "eval", r["last_step"].as_u64());
            let d: Vec<String> = r["d"]
                .as_array()
                .map(|a| a.iter().map(|x| f(x, 4)).collect())
                .unwrap_or_default();
            o += &format!(
                "| {} | {}–{} | {} → {} | {} | {} | {} / {} | {} |\n",
                s(&r["stage"]),
                s(&r["first_step"]),
                s(&r["last_step"]),
                count(&r["layers_before"]),
                count(&r["layers"]),
                s(&r["removed"]),
                d.join(", "),
                f(&r["student_ppl"], 2),
                f(&r["kl"], 4),
                end.map_or("—".to_string(), |e| format!(
                    "{} / {} / {}",
                    f(&e["student_ppl"], 2),
                    f(&e["kl"], 4),
                    f(&e["top1"], 3)
                ))
            );
        }
    }
    if let Some(sum) = record(records, "summary", None) {
        o += &format!(
            "\nSkipped steps (non-finite loss or gradient): {}. Wall time: {} s.\n\n",
            s(&sum["skipped_steps"]),
            f(&sum["seconds"], 0)
        );
    }
    o += "## Files\n\n";
    for (file, what) in [
        (
            "student/",
            "the distilled student (Hugging Face folder; `AutoModelForCausalLM.from_pretrained`)",
        ),
        (
            "metrics.jsonl",
            "one line per logged step and per evaluation",
        ),
        ("loss.png", "training loss and validation KL"),
        (
            "sources.png",
            "each source's validation KL (a run with [[data.source]])",
        ),
        (
            "checkpoints/",
            "resumable checkpoints (`distill train RUN --resume`)",
        ),
    ]
    .into_iter()
    .filter(|(file, _)| *file != "sources.png" || last.is_some_and(|r| r.get("sources").is_some()))
    {
        o += &format!("- `{}` — {what}\n", dir.join(file).display());
    }
    o
}
