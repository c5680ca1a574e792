//! What a run leaves for the user: `metrics.jsonl` (one JSON object per logged step and per
//! evaluation), `loss.png` (training and validation curves) and `report.md`.
use crate::io::{read_to_string, write_atomic};
use crate::{Error, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Append-only metrics file; each line is flushed and fsynced as it is written.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Open for appending. With `keep_through = Some(step)` (a resumed run), lines of later steps —
    /// written after the checkpoint by the run that died — are dropped first, so that no step
    /// appears twice. With None the file starts empty.
    pub fn open(path: &Path, keep_through: Option<usize>) -> Result<Self> {
        let kept = match keep_through {
            Some(step) if path.exists() => read_to_string(path)?
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_some_and(|s| s as usize <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
            _ => String::new(),
        };
        write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, record: &Value) -> Result<()> {
        let line = format!("{record}\n");
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(|e| Error::io(&self.path, e))
    }
}

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

/// The run's summary as Markdown.
pub fn markdown(
    cfg: &crate::config::RunConfig,
    run_file: Option<&Path>,
    teacher: &crate::model::LoadedModel,
    student: &crate::model::LoadedModel,
    ds: &crate::data::Dataset,
    s: &crate::train::TrainSummary,
    (teacher_tps, student_tps): (f64, f64),
) -> String {
    let (tc, sc) = (&teacher.model.config, &student.model.config);
    let mut o = String::new();
    o += "# distill report\n\n";
    if let Some(f) = run_file {
        o += &format!("Run file: `{}`\n\n", f.display());
    }
    o += "## Models\n\n| | teacher | student |\n|---|---|---|\n";
    o += &format!(
        "| source | `{}` | {} |\n",
        teacher.source.display(),
        match &cfg.student {
            crate::config::StudentInit::Path(p) => format!("`{}`", p.display()),
            crate::config::StudentInit::FromTeacher { layers } =>
                format!("teacher layers {layers:?}"),
        }
    );
    o += &format!(
        "| parameters | {:.1}M | {:.1}M |\n",
        tc.num_params() as f64 / 1e6,
        sc.num_params() as f64 / 1e6
    );
    o += &format!(
        "| layers | {} | {} |\n",
        tc.num_hidden_layers, sc.num_hidden_layers
    );
    o += &format!("| forward speed (tokens/s, CPU) | {teacher_tps:.0} | {student_tps:.0} |\n\n");
    o += "## Data and objective\n\n";
    o += &format!(
        "- train: `{}` — {} sequences of {} tokens ({} target tokens)\n- validation: {} sequences\n",
        cfg.data.train.display(),
        ds.train.len(),
        cfg.data.seq_len,
        ds.train_tokens,
        ds.validation.len()
    );
    let terms: Vec<String> = cfg
        .losses
        .iter()
        .map(|l| format!("{} × {:?}", l.weight, l.kind))
        .collect();
    o += &format!("- objective: {}\n", terms.join(" + "));
    o += &format!(
        "- AdamW lr {} ({:?} schedule, {} warm-up steps), micro-batch {} × accumulation {}, {} steps, seed {}\n\n",
        cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.micro_batch, cfg.optim.grad_accum, s.steps, cfg.seed
    );
    o += "## Validation\n\n| | student ppl | teacher ppl | KL(teacher‖student)/token | top-1 agreement |\n|---|---|---|---|---|\n";
    let row = |name: &str, m: &crate::eval::DistillMetrics| {
        format!(
            "| {name} | {:.3} | {:.3} | {:.4} | {:.3} |\n",
            m.student_ppl, m.teacher_ppl, m.kl, m.top1
        )
    };
    if let Some(b) = &s.before {
        o += &row("before", b);
    }
    o += &row("after", &s.after);
    o += &format!(
        "\nSkipped steps (non-finite loss or gradient): {}. Wall time: {:.0} s.\n\n",
        s.skipped_steps, s.seconds
    );
    o += "## Files\n\n";
    for (f, what) in [
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
            "checkpoints/",
            "resumable checkpoints (`distill train RUN --resume`)",
        ),
    ] {
        o += &format!("- `{}` — {what}\n", s.output.join(f).display());
    }
    o
}
