//! The `distill` command line: parses arguments, calls the library, reports errors as one line
//! (`distill: …`, exit code 2).
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use distill::generate::{generate, GenerateOptions};
use distill::model::{self, LoadedModel, Message};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "distill",
    version,
    about = "Knowledge distillation for Llama-family causal LMs"
)]
struct Cli {
    /// Intra-op threads for libtorch (default: all cores)
    #[arg(long, global = true)]
    threads: Option<i32>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a model (HF folder or .gguf): architecture, sizes, tokenizer
    Inspect { model: PathBuf },
    /// Generate text from a prompt, streaming tokens to stdout
    Generate {
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user turn with the model's chat template
        #[arg(long)]
        chat: bool,
        /// System message (with --chat)
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 = greedy
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Perplexity of a model over a text file
    Eval {
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// Window length in tokens (capped at the model's context)
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Evaluate only the first N tokens of the file
        #[arg(long)]
        max_tokens: Option<usize>,
    },
    /// Convert a model (GGUF or HF folder) into a Hugging Face folder
    Convert {
        model: PathBuf,
        out_dir: PathBuf,
        /// Keep only these decoder layers (a student made from the model), e.g. 0,3,6,29
        #[arg(long, value_delimiter = ',')]
        layers: Option<Vec<usize>>,
    },
    /// Benchmarks: a distillation step, the loss kernels, the matmul peak
    #[command(subcommand)]
    Bench(BenchCommand),
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

#[derive(Subcommand)]
enum BenchCommand {
    /// Time full distillation steps (teacher forward, student forward and backward, loss, AdamW)
    Step {
        #[arg(long)]
        teacher: PathBuf,
        #[arg(long)]
        student: PathBuf,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 512)]
        seq: usize,
        /// forward_kl, reverse_kl or jsd (temperature 1)
        #[arg(long, default_value = "forward_kl")]
        loss: String,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Positions per chunk of the objective (default: whole tensors)
        #[arg(long)]
        chunk: Option<usize>,
        /// Also write the report as JSON here
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Forward + backward time and memory of each divergence over random logits
    Losses {
        #[arg(long, value_delimiter = ',', default_value = "4,512,49152")]
        shape: Vec<i64>,
        #[arg(long, default_value_t = 2)]
        reps: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The f32 matmul peak of this machine at the current thread count
    Matmul {
        #[arg(long, default_value_t = 1024)]
        n: i64,
    },
}

fn write_json(path: Option<&Path>, v: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    println!("{text}");
    if let Some(p) = path {
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn bench(cmd: BenchCommand) -> Result<()> {
    use distill::config::LossKind;
    match cmd {
        BenchCommand::Step {
            teacher,
            student,
            batch,
            seq,
            loss,
            steps,
            warmup,
            chunk,
            json,
        } => {
            let kind = match loss.as_str() {
                "forward_kl" => LossKind::ForwardKl { temperature: 1.0 },
                "reverse_kl" => LossKind::ReverseKl { temperature: 1.0 },
                "jsd" => LossKind::Jsd {
                    beta: 0.5,
                    temperature: 1.0,
                },
                other => bail!("--loss {other}: expected forward_kl, reverse_kl or jsd"),
            };
            if batch == 0 || seq < 2 || steps == 0 {
                bail!("bench step needs --batch ≥ 1, --seq ≥ 2 and --steps ≥ 1");
            }
            let (t, s) = (load(&teacher)?, load(&student)?);
            let mut t = t;
            t.vs.freeze();
            let r = distill::bench::step(&t, &s, kind, batch, seq, steps, warmup, chunk)?;
            write_json(json.as_deref(), &r)
        }
        BenchCommand::Losses { shape, reps, .. }
            if shape.len() < 2 || shape.iter().any(|&d| d < 1) || reps == 0 =>
        {
            bail!("bench losses needs a --shape of at least two positive sizes (…, V) and --reps ≥ 1, got {shape:?}")
        }
        BenchCommand::Losses { shape, reps, json } => {
            write_json(json.as_deref(), &distill::bench::losses(&shape, reps)?)
        }
        BenchCommand::Matmul { n } => {
            println!(
                "matmul f32 {n}x{n}, {} threads: {:.1} GFLOP/s",
                tch::get_num_threads(),
                distill::bench::matmul_peak_gflops(n)
            );
            Ok(())
        }
    }
}

fn load(path: &Path) -> Result<LoadedModel> {
    let t = std::time::Instant::now();
    let m = model::load(path, tch::Device::Cpu).context("loading model")?;
    tracing::info!(
        "loaded {} in {:.1}s",
        path.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(m)
}

fn inspect(m: &LoadedModel) -> Result<()> {
    let c = &m.model.config;
    println!("model:          {}", m.source.display());
    println!("format:         {}", m.format);
    println!(
        "architecture:   {} ({})",
        c.arch.model_type(),
        c.arch.hf_class()
    );
    println!(
        "parameters:     {} ({:.1}M)",
        c.num_params(),
        c.num_params() as f64 / 1e6
    );
    println!("layers:         {}", c.num_hidden_layers);
    println!("hidden size:    {}", c.hidden_size);
    println!("intermediate:   {}", c.intermediate_size);
    println!(
        "heads:          {} query / {} key-value, head dim {}",
        c.num_attention_heads, c.num_key_value_heads, c.head_dim
    );
    println!("vocab:          {}", c.vocab_size);
    println!("context:        {}", c.max_position_embeddings);
    println!(
        "rope:           theta {} scaling {:?}",
        c.rope_theta, c.rope_scaling
    );
    println!("tied embedding: {}", c.tie_word_embeddings);
    let types: Vec<String> = m
        .weight_types
        .iter()
        .map(|(k, v)| format!("{k} x{v}"))
        .collect();
    println!("stored dtypes:  {} (computed in f32)", types.join(", "));
    match &m.tokenizer {
        Some(t) => {
            println!(
                "tokenizer:      {} tokens, bos {:?}, eos {:?}",
                t.vocab_size(),
                t.bos_token,
                t.eos_token
            );
            println!(
                "chat template:  {}",
                if t.chat_template.is_some() {
                    "present"
                } else {
                    "absent"
                }
            );
        }
        None => println!("tokenizer:      absent"),
    }
    Ok(())
}

fn stop_ids(m: &LoadedModel) -> Vec<u32> {
    let mut ids = m.model.config.eos_token_ids.clone();
    if let Some(t) = &m.tokenizer {
        if let Some(id) = t.eos_token.as_deref().and_then(|e| t.token_to_id(e)) {
            ids.push(id);
        }
    }
    ids
}

#[allow(clippy::too_many_arguments)]
fn run_generate(
    m: &LoadedModel,
    prompt: &str,
    chat: bool,
    system: Option<&str>,
    max_new_tokens: usize,
    temperature: f64,
    top_p: f64,
    seed: u64,
) -> Result<String> {
    let tok = m.tokenizer.as_ref().context("the model has no tokenizer")?;
    let text = if chat {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message {
                role: "system".into(),
                content: s.into(),
            });
        }
        messages.push(Message {
            role: "user".into(),
            content: prompt.into(),
        });
        tok.apply_chat_template(&messages, true)?
    } else {
        prompt.to_string()
    };
    let ids = tok.encode(&text, !chat)?;
    if !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
        bail!("--top-p must be in (0, 1], got {top_p}");
    }
    let opts = GenerateOptions {
        max_new_tokens,
        temperature,
        top_p,
        seed,
        stop_ids: stop_ids(m),
    };
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut stdout = std::io::stdout();
    generate(&m.model, &ids, &opts, |id| {
        generated.push(id);
        let s = tok.decode(&generated, true)?;
        // print only complete characters: a trailing U+FFFD may be a partial UTF-8 sequence
        if !s.ends_with('\u{FFFD}') && s.len() > printed && s.is_char_boundary(printed) {
            let _ = write!(stdout, "{}", &s[printed..]);
            let _ = stdout.flush();
            printed = s.len();
        }
        Ok(())
    })?;
    let s = tok.decode(&generated, true)?;
    if s.len() > printed && s.is_char_boundary(printed) {
        print!("{}", &s[printed..]);
    }
    println!();
    Ok(s)
}

const DEMO_RUN: &str = include_str!("../examples/demo.toml");

fn print_summary(s: &distill::train::TrainSummary) {
    println!(
        "\n{:<8} {:>12} {:>12} {:>10} {:>8}",
        "", "student ppl", "teacher ppl", "KL/token", "top-1"
    );
    let row = |name: &str, m: &distill::eval::DistillMetrics| {
        println!(
            "{name:<8} {:>12.3} {:>12.3} {:>10.4} {:>8.3}",
            m.student_ppl, m.teacher_ppl, m.kl, m.top1
        )
    };
    if let Some(b) = &s.before {
        row("before", b);
    }
    row("after", &s.after);
    println!(
        "\n{} steps ({} skipped) in {:.0} s",
        s.steps, s.skipped_steps, s.seconds
    );
    println!("student: {}", s.output.join("student").display());
    println!("report:  {}", s.output.join("report.md").display());
}

fn train(cfg: &distill::config::RunConfig, opts: &distill::train::TrainOptions) -> Result<()> {
    let summary = distill::train::train(cfg, opts)?;
    print_summary(&summary);
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as i32));
    if threads < 1 {
        bail!("--threads must be at least 1, got {threads}");
    }
    tch::set_num_threads(threads);
    match cli.command {
        Command::Inspect { model } => inspect(&load(&model)?),
        Command::Generate {
            model,
            prompt,
            chat,
            system,
            max_new_tokens,
            temperature,
            top_p,
            seed,
        } => {
            let m = load(&model)?;
            run_generate(
                &m,
                &prompt,
                chat,
                system.as_deref(),
                max_new_tokens,
                temperature,
                top_p,
                seed,
            )?;
            Ok(())
        }
        Command::Eval {
            model,
            data,
            seq_len,
            batch,
            max_tokens,
        } => {
            let m = load(&model)?;
            let tok = m.tokenizer.as_ref().context("the model has no tokenizer")?;
            let text = std::fs::read_to_string(&data)
                .with_context(|| format!("reading {}", data.display()))?;
            let mut ids = tok.encode(&text, true)?;
            if let Some(n) = max_tokens {
                ids.truncate(n);
            }
            let window = seq_len.min(m.model.config.max_position_embeddings);
            let p = distill::eval::perplexity(&m.model, &ids, window, batch)
                .with_context(|| format!("evaluating on {}", data.display()))?;
            println!("perplexity: {:.6}", p.value());
            println!("tokens: {}", p.tokens);
            println!("tokens/s: {:.1}", p.tokens as f64 / p.seconds);
            Ok(())
        }
        Command::Bench(cmd) => bench(cmd),
        Command::Convert {
            model,
            out_dir,
            layers,
        } => {
            if out_dir.join("config.json").exists() || out_dir.is_file() {
                bail!(
                    "{}: already holds a model; choose an empty folder",
                    out_dir.display()
                );
            }
            let mut m = load(&model)?;
            if let Some(layers) = layers {
                m = distill::student::from_teacher_layers(&m, &layers, tch::Device::Cpu)?;
            }
            m.save_hf(&out_dir)
                .with_context(|| format!("writing {}", out_dir.display()))?;
            println!("wrote {}", out_dir.display());
            Ok(())
        }
        Command::Train {
            run_file,
            resume,
            overwrite,
            set,
        } => {
            let cfg = distill::config::RunConfig::load(&run_file, &set)?;
            let opts = distill::train::TrainOptions {
                resume,
                overwrite,
                progress: true,
                run_file: Some(run_file),
            };
            train(&cfg, &opts)
        }
        Command::Demo { mut set, overwrite } => {
            // the demo assets may live elsewhere (scripts/setup.sh exports where)
            for (key, var) in [
                ("teacher.path", "DISTILL_DEMO_TEACHER"),
                ("data.train", "DISTILL_DEMO_TEXTS"),
            ] {
                if let Some(v) = std::env::var_os(var) {
                    set.insert(0, format!("{key}={:?}", v.to_string_lossy()));
                }
            }
            let here = std::env::current_dir()?.join("demo.toml");
            let mut table: toml::Table = toml::from_str(DEMO_RUN)?;
            distill::config::apply_overrides(&mut table, &set)?;
            let cfg = distill::config::RunConfig::from_str(&toml::to_string(&table)?, &here)?;
            if !cfg.teacher.exists() {
                bail!(
                    "{}: demo teacher not found; run scripts/setup.sh first",
                    cfg.teacher.display()
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
                cfg.teacher.display(),
                cfg.output.display()
            );
            train(&cfg, &opts)?;
            let q = "What is the capital of France?";
            for (who, path) in [
                ("teacher", cfg.teacher.clone()),
                ("student", cfg.output.join("student")),
            ] {
                println!("\n{who} > {q}");
                run_generate(&load(&path)?, q, true, None, 32, 0.0, 1.0, 0)?;
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DISTILL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // A panic is a bug, but the user still gets one line, not a backtrace.
    std::panic::set_hook(Box::new(|_| {}));
    match std::panic::catch_unwind(|| run(cli)) {
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
