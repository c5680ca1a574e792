//! `distill store inspect PATH` and `distill store verify PATH [--teacher T] [--positions N]`.
use anyhow::Result;
use distill::teacher::store::verify::{inspect, verify};
use distill::teacher::store::writer::describe;
use distill::teacher::Store;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum StoreCommand {
    /// What a store holds: positions, bytes per token, k, captured mass, fingerprints
    Inspect {
        path: PathBuf,
        /// Print the numbers as JSON
        #[arg(long)]
        json: bool,
    },
    /// Recompute a sample of stored positions with the teacher: KL(full ‖ reconstructed), top-1
    /// agreement, captured mass
    Verify {
        path: PathBuf,
        /// The teacher (default: where the store says it was read from)
        #[arg(long)]
        teacher: Option<PathBuf>,
        /// About this many positions, in whole sequences spread over the store
        #[arg(long, default_value_t = 2048)]
        positions: usize,
        /// Print the numbers as JSON
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: StoreCommand, device: tch::Device) -> Result<()> {
    match cmd {
        StoreCommand::Inspect { path, json } => {
            let store = Store::open(&path)?;
            let i = inspect(&store)?;
            let h = &store.header;
            if json {
                // the numbers, and what the store belongs to (store.json less each shard's keys)
                let mut j = serde_json::to_value(&i)?;
                let shards: Vec<serde_json::Value> = h
                    .shards
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "file": s.file,
                            "sequences": s.sequences,
                            "positions": s.positions,
                            "bytes": s.bytes,
                            "checksum": s.checksum,
                        })
                    })
                    .collect();
                if let Some(o) = j.as_object_mut() {
                    o.insert("format".into(), serde_json::json!(h.format));
                    o.insert("version".into(), serde_json::json!(h.version));
                    o.insert("identity".into(), serde_json::to_value(&h.identity)?);
                    o.insert("teacher_source".into(), serde_json::json!(h.teacher_source));
                    o.insert("teacher_dtype".into(), serde_json::json!(h.teacher_dtype));
                    o.insert("vocab_rows".into(), serde_json::json!(h.vocab_rows));
                    o.insert("selection".into(), serde_json::to_value(h.selection)?);
                    o.insert("captures".into(), serde_json::to_value(&h.captures)?);
                    o.insert("shard_files".into(), serde_json::Value::Array(shards));
                }
                println!("{}", serde_json::to_string_pretty(&j)?);
                return Ok(());
            }
            println!("store      {}", path.display());
            println!(
                "teacher    {} ({}), identity {}",
                h.teacher_source, h.teacher_dtype, h.identity.teacher
            );
            println!(
                "tokenizer  {}, chat template {}, seq_len {}, packing {}",
                h.identity.tokenizer,
                h.identity.chat_template,
                h.identity.seq_len,
                h.identity.packing
            );
            println!("selection  {}", describe(&h.selection));
            for c in &h.captures {
                println!(
                    "data       fingerprint {} ({} sequences{})",
                    c.fingerprint,
                    c.sequences,
                    if c.appended { ", appended" } else { "" }
                );
            }
            println!(
                "holds      {} sequences, {} positions (tokens) in {} shards, {} bytes",
                i.sequences, i.positions, i.shards, i.bytes
            );
            println!(
                "per token  {:.1} bytes, k mean {:.1} (p90 {}), captured mass {:.4}",
                i.bytes_per_token, i.mean_k, i.p90_k, i.mean_mass
            );
            Ok(())
        }
        StoreCommand::Verify {
            path,
            teacher,
            positions,
            json,
        } => {
            let store = Store::open(&path)?;
            let h = &store.header;
            let tpath = teacher.unwrap_or_else(|| PathBuf::from(&h.teacher_source));
            let mut t = super::load(&tpath, device)?;
            let dtype = distill::device::Dtype::parse(&h.teacher_dtype)
                .map_err(|m| anyhow::anyhow!("{}: teacher_dtype: {m}", path.display()))?;
            if dtype.kind() != tch::Kind::Float {
                t.vs.set_kind(dtype.kind());
            }
            t.model.set_compute_kind(dtype.kind());
            let v = verify(&store, &t, &tpath, &h.teacher_dtype, positions, device)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if !v.teacher_matches {
                println!(
                    "warning: {} is not the teacher the store was captured from (its identity differs)",
                    tpath.display()
                );
            }
            println!(
                "{} positions in {} sequences at T = {}",
                v.positions, v.sequences, h.selection.temperature
            );
            if h.selection.tail_samples > 0 {
                println!(
                    "(tail draws: the drawn tokens hold estimates m·c/n, not p; KL(reduced), top-1 and |Δ log p| below compare them with the exact p, i.e. measure the draws' noise; KL(full ‖ reconstructed) gives the tokens never drawn Good–Turing's estimate of the mass the draws missed, spread evenly)"
                );
            }
            println!("captured mass             {:.4}", v.captured_mass);
            println!(
                "KL(full ‖ reconstructed)  {:.4} nats ({})",
                v.kl_reconstructed,
                if h.selection.tail_samples > 0 {
                    "head as stored, draws at their estimates, the unseen mass spread evenly"
                } else {
                    "tail spread evenly"
                }
            );
            println!(
                "KL(reduced)               {:.6} nats (quantisation only)",
                v.kl_reduced
            );
            println!("top-1 agreement           {:.4}", v.top1);
            println!("max |Δ log p|             {:.4}", v.max_abs_logprob_error);
            Ok(())
        }
    }
}
