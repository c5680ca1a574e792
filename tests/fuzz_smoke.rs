//! A bounded fuzz run inside the suite (the cargo-fuzz targets in fuzz/ run the same readers
//! without a bound). Real small files (a tiny GGUF model, a tiny Hugging Face folder, the example
//! run files) are mutated deterministically (fixed seed): bit flips, truncations, byte insertions
//! and deletions, large integers spliced into length fields, numbers in text replaced by extreme
//! ones. Each case goes to the GGUF reader, the safetensors reader, the model loader behind both
//! (config, shape checks, model, tokenizer) and the run-file reader, and must
//! - return (Ok or Err) without a panic (each call runs inside `catch_unwind`), and
//! - hold at most a small multiple of its input's size on the Rust heap at its peak.
//!
//! What the heap bound covers: allocations through Rust's global allocator made on the calling
//! thread (a counting `#[global_allocator]` below). libtorch allocates tensors with its own
//! allocator, unseen there; for the loaders (which make tensors) the process's peak resident
//! memory is measured as well (Linux: /proc/self/status VmHWM, reset per case through
//! /proc/self/clear_refs; the tests of this binary run one at a time for it), and a model that
//! loads must have no more parameter bytes than a small multiple of its files' bytes. The readers
//! make no tensor before the header is checked whole.
#[path = "common/tiny_gguf.rs"]
mod tiny_gguf;

use distill::model::{self, gguf::GgufFile, hf, LlamaConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

// ---- a counting allocator: live and peak bytes of the current thread ----

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is passed to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            note(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            note(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        note(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            note(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// The tests of this binary run one at a time: resident memory is per process.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A `/proc/self/status` field in bytes (VmRSS, VmHWM).
fn status_bytes(field: &str) -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What a guarded call held at its peak: Rust heap bytes on this thread above what was live when
/// it started, and (on Linux) resident bytes of the process above its start.
struct Held {
    heap: usize,
    resident: Option<usize>,
}

/// Run `f` inside `catch_unwind`: its result (None on a panic) and what it held at its peak.
fn guarded<R>(f: impl FnOnce() -> R) -> (Option<R>, Held) {
    // "5" resets the peak resident size to the current one (Linux 4.0+)
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let rss = status_bytes("VmRSS:").filter(|_| reset);
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = catch_unwind(AssertUnwindSafe(f)).ok();
    let heap = (PEAK.with(Cell::get) - base).max(0) as usize;
    let resident = rss.and_then(|before| Some(status_bytes("VmHWM:")?.saturating_sub(before)));
    (r, Held { heap, resident })
}

// ---- deterministic mutations ----

/// splitmix64: a fixed seed gives the same cases on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

const BIG: [u64; 10] = [
    0,
    1 << 31,
    1 << 32,
    1 << 40,
    1 << 62,
    1 << 63,
    u32::MAX as u64,
    u64::MAX,
    u64::MAX - 7,
    0x0101_0101_0101_0101,
];

const BIG_TEXT: [&str; 14] = [
    // sizes libtorch would allocate (a GB or so) before a late shape check
    "65536",
    "1048576",
    "18446744073709551615",
    "9223372036854775807",
    "9223372036854775808",
    "4294967296",
    "1099511627776",
    "-1",
    "0",
    "1e308",
    "-0.0",
    "nan",
    "inf",
    "99999999999999999999999999",
];

/// What to mutate in a file: `hot` is its header (most mutations land there, where the lengths
/// and counts are); `fields` are offsets of little-endian integers (lengths, counts, dims,
/// offsets) into which large values are spliced; `text` marks a header or file that is text.
struct Target<'a> {
    bytes: &'a [u8],
    hot: std::ops::Range<usize>,
    fields: Vec<usize>,
    text: bool,
}

impl Target<'_> {
    /// Offsets in the header where a u64 or a u32 holds a small positive value: the lengths,
    /// counts, dims, offsets and size values of a binary header (and some false positives, which
    /// are mutations too).
    fn small_ints(bytes: &[u8], hot: &std::ops::Range<usize>) -> Vec<usize> {
        (hot.start..hot.end.saturating_sub(8))
            .filter(|&i| {
                let v = u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
                let w = u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap()) as u64;
                (1..=bytes.len() as u64).contains(&v) || (1..=bytes.len() as u64).contains(&w)
            })
            .collect()
    }

    fn mutate(&self, rng: &mut Rng) -> Vec<u8> {
        let mut b = self.bytes.to_vec();
        let at = |rng: &mut Rng, len: usize| {
            if rng.below(10) < 9 && !self.hot.is_empty() {
                self.hot.start + rng.below(self.hot.len().min(len))
            } else {
                rng.below(len)
            }
        };
        let kinds = if self.text { 7 } else { 5 };
        match rng.below(kinds) {
            0 => {
                for _ in 0..1 + rng.below(4) {
                    let i = at(rng, b.len());
                    b[i] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let i = at(rng, b.len());
                b.truncate(i);
            }
            2 => {
                let i = at(rng, b.len());
                let n = 1 + rng.below(16);
                let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                b.splice(i..i, ins);
            }
            3 => {
                let i = at(rng, b.len());
                let n = (1 + rng.below(16)).min(b.len() - i);
                b.drain(i..i + n);
            }
            4 => {
                // a large integer into a length field (u64 or, at the same place, u32)
                let i = match self.fields.is_empty() {
                    true => at(rng, b.len()),
                    false => *rng.pick(&self.fields),
                };
                let v = *rng.pick(&BIG);
                let bytes = v.to_le_bytes();
                let w = if rng.below(4) == 0 { 4 } else { 8 };
                let end = (i + w).min(b.len());
                b[i..end].copy_from_slice(&bytes[..end - i]);
            }
            5 => {
                // a number in text replaced by an extreme one
                let digits: Vec<usize> = self
                    .hot
                    .clone()
                    .filter(|&i| b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_digit()))
                    .collect();
                if let Some(&i) = (!digits.is_empty()).then(|| rng.pick(&digits)) {
                    let j = (i..b.len())
                        .find(|&j| !b[j].is_ascii_digit())
                        .unwrap_or(b.len());
                    b.splice(i..j, rng.pick(&BIG_TEXT).bytes());
                }
            }
            _ => {
                // a piece of the text repeated elsewhere (duplicate keys, sections, brackets)
                let i = at(rng, b.len());
                let n = 1 + rng.below(40).min(b.len() - i);
                let piece = b[i..(i + n).min(b.len())].to_vec();
                let k = at(rng, b.len());
                b.splice(k..k, piece);
            }
        }
        b
    }
}

/// Run `cases` mutations of `target` through `check` (a guarded call: Ok(whether the reader
/// accepted the input), or an error string);
/// fail with every panic, every error and every case whose heap peak exceeds `bound(input length)`
/// or, when given, whose resident peak exceeds `resident_bound(input length)`.
fn run(
    name: &str,
    seed: u64,
    cases: usize,
    target: &Target,
    check: impl Fn(Vec<u8>) -> (Option<Result<bool, String>>, Held),
    bound: impl Fn(usize) -> usize,
    resident_bound: Option<&dyn Fn(usize) -> usize>,
) {
    let _serial = one_at_a_time();
    let mut rng = Rng(seed);
    let mut failures = Vec::new();
    let (mut worst, mut largest, mut accepted) = ((0.0f64, 0usize), 0usize, 0usize);
    for case in 0..cases {
        let input = target.mutate(&mut rng);
        let len = input.len();
        let (r, held) = check(input);
        let peak = held.heap;
        match r {
            None => failures.push(format!("{name} case {case}: panicked")),
            Some(Err(e)) => failures.push(format!("{name} case {case}: {e}")),
            Some(Ok(ok)) => accepted += ok as usize,
        }
        if peak > bound(len) {
            failures.push(format!(
                "{name} case {case}: held {peak} bytes for an input of {len} (bound {})",
                bound(len)
            ));
        }
        if let (Some(rb), Some(rss)) = (resident_bound, held.resident) {
            if rss > rb(len) {
                failures.push(format!(
                    "{name} case {case}: resident memory grew by {rss} bytes for an input of {len} (bound {})",
                    rb(len)
                ));
            }
        }
        let share = peak as f64 / bound(len) as f64;
        if share > worst.0 {
            worst = (share, case);
        }
        largest = largest.max(peak);
    }
    eprintln!(
        "{name}: {cases} cases, {accepted} accepted; heap peak at most {:.0}% of its bound (case {}); largest peak {largest} bytes",
        100.0 * worst.0,
        worst.1
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
}

/// A loaded model's parameter bytes (f32) must not exceed `factor` × the bytes of its files:
/// the loader checked the config against the weights before allocating.
fn params_within(m: &model::LoadedModel, file_bytes: usize, factor: usize) -> Result<bool, String> {
    let params: i64 = m.vs.variables().values().map(|t| t.numel() as i64).sum();
    if params as usize * 4 > factor * file_bytes {
        return Err(format!(
            "loaded {params} parameters ({} bytes) from {file_bytes} bytes of files",
            params * 4
        ));
    }
    Ok(true)
}

// Bounds. The GGUF reader holds, per byte of the file, at most one 32-byte `Value` (an array of
// 1-byte items) in the header and 4 bytes per 0.5625 byte of Q4 data once dequantised (7.1×):
// 32× the input. Safetensors' header is JSON parsed into maps of names, shapes and offsets, below
// 32 bytes per header byte. The run file is TOML parsed into a table, then into typed structs:
// 32× again. The constant covers fixed-size state (the error strings, the tokenizer's compiled
// pre-tokenizer regex, small maps), independent of the input.
const FIXED: usize = 1 << 20;
fn reader_bound(len: usize) -> usize {
    32 * len + FIXED
}
/// Building the tokenizer from the GGUF vocabulary goes through a JSON document of it and the
/// tokenizers crate's maps: a few copies of each token, twice the reader's allowance.
fn loader_bound(len: usize) -> usize {
    64 * len + 4 * FIXED
}
/// Resident memory of a load: the file's tensors as f32 (at most 2× f16 data, 7.1× dequantised
/// Q4 data) and the model's copy of them (as much again), so under 16× the files; plus what the
/// first calls of libtorch and the allocator's arenas take, which does not depend on the input.
fn resident_bound(len: usize) -> usize {
    16 * len + (64 << 20)
}

/// The byte range of a tiny GGUF's header: it ends where the tensor data begins (each tensor but the
/// last padded to 32 bytes).
fn gguf_header(g: &tiny_gguf::TinyGguf, bytes: &[u8]) -> std::ops::Range<usize> {
    let n = g.tensors.len();
    let data: usize = g.tensors[..n - 1]
        .iter()
        .map(|t| t.3.len().div_ceil(32) * 32)
        .sum::<usize>()
        + g.tensors[n - 1].3.len();
    0..bytes.len() - data
}

#[test]
fn gguf_reader_survives_mutated_files() {
    let g = tiny_gguf::TinyGguf::new();
    let bytes = g.bytes();
    let hot = gguf_header(&g, &bytes);
    let target = Target {
        fields: Target::small_ints(&bytes, &hot),
        bytes: &bytes,
        hot,
        text: false,
    };
    assert!(GgufFile::from_bytes(bytes.clone(), Path::new("tiny.gguf")).is_ok());
    run(
        "gguf reader",
        1,
        3000,
        &target,
        |input| {
            guarded(|| {
                let Ok(f) = GgufFile::from_bytes(input, Path::new("fuzz.gguf")) else {
                    return Ok(false);
                };
                for t in &f.tensors {
                    let _ = f.dequantize(t);
                }
                Ok(true)
            })
        },
        reader_bound,
        None,
    );
}

#[test]
fn gguf_model_loader_survives_mutated_files() {
    let g = tiny_gguf::TinyGguf::new();
    let bytes = g.bytes();
    let hot = gguf_header(&g, &bytes);
    let target = Target {
        fields: Target::small_ints(&bytes, &hot),
        bytes: &bytes,
        hot,
        text: false,
    };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fuzz.gguf");
    std::fs::write(&p, &bytes).unwrap();
    assert!(model::load(&p, tch::Device::Cpu).is_ok());
    run(
        "gguf loader",
        2,
        1000,
        &target,
        |input| {
            let len = input.len();
            std::fs::write(&p, &input).unwrap();
            drop(input);
            guarded(|| match model::load(&p, tch::Device::Cpu) {
                Ok(m) => params_within(&m, len, 8),
                Err(_) => Ok(false),
            })
        },
        loader_bound,
        Some(&resident_bound),
    );
}

/// A tiny Hugging Face folder (config.json, model.safetensors, tokenizer files).
fn tiny_folder() -> tempfile::TempDir {
    let mut m = model::random(&LlamaConfig::tiny(64, 32, 2, 4, 2), tch::Device::Cpu, 0).unwrap();
    m.tokenizer = Some(distill::model::Tokenizer::byte_level(&["<|endoftext|>"]).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    m.save_hf(tmp.path()).unwrap();
    tmp
}

#[test]
fn safetensors_reader_and_folder_loader_survive_mutated_files() {
    let dir = tiny_folder();
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let target = Target {
        bytes: &bytes,
        hot: 0..header,
        fields: vec![0],
        text: true,
    };
    assert!(hf::parse_safetensors(&bytes, &st).is_ok());
    assert!(model::load(dir.path(), tch::Device::Cpu).is_ok());
    run(
        "safetensors reader",
        3,
        3000,
        &target,
        |input| {
            guarded(|| Ok(hf::parse_safetensors(&input, Path::new("fuzz.safetensors")).is_ok()))
        },
        reader_bound,
        None,
    );
    // the same mutations through the loader: header, shapes and config checked together
    let others: usize = ["config.json", "tokenizer.json", "tokenizer_config.json"]
        .iter()
        .map(|f| std::fs::metadata(dir.path().join(f)).map_or(0, |m| m.len() as usize))
        .sum();
    run(
        "safetensors loader",
        4,
        800,
        &target,
        |input| {
            let len = input.len() + others;
            std::fs::write(&st, &input).unwrap();
            drop(input);
            guarded(|| match model::load(dir.path(), tch::Device::Cpu) {
                Ok(m) => params_within(&m, len, 8),
                Err(_) => Ok(false),
            })
        },
        |len| loader_bound(len + others),
        Some(&|len| resident_bound(len + others)),
    );
}

#[test]
fn config_json_mutations_never_allocate_beyond_the_weights() {
    let dir = tiny_folder();
    let cfg = dir.path().join("config.json");
    let text = std::fs::read(&cfg).unwrap();
    let weights = std::fs::metadata(dir.path().join("model.safetensors"))
        .unwrap()
        .len() as usize;
    let target = Target {
        bytes: &text,
        hot: 0..text.len(),
        fields: vec![],
        text: true,
    };
    run(
        "config.json loader",
        5,
        600,
        &target,
        |input| {
            std::fs::write(&cfg, &input).unwrap();
            guarded(|| match model::load(dir.path(), tch::Device::Cpu) {
                Ok(m) => params_within(&m, weights, 1),
                Err(_) => Ok(false),
            })
        },
        |len| loader_bound(len + weights),
        Some(&|len| resident_bound(len + weights)),
    );
}

#[test]
fn run_file_reader_survives_mutated_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (i, name) in ["examples/demo.toml", "examples/chat.toml"]
        .iter()
        .enumerate()
    {
        let text = std::fs::read(root.join(name)).unwrap();
        let target = Target {
            bytes: &text,
            hot: 0..text.len(),
            fields: vec![],
            text: true,
        };
        let path = root.join(name);
        assert!(
            distill::config::RunConfig::from_str(std::str::from_utf8(&text).unwrap(), &path)
                .is_ok()
        );
        run(
            name,
            6 + i as u64,
            2000,
            &target,
            |input| {
                guarded(|| {
                    let text = String::from_utf8_lossy(&input);
                    Ok(distill::config::RunConfig::from_str(&text, &path).is_ok())
                })
            },
            reader_bound,
            None,
        );
    }
}

#[test]
fn config_sizes_the_weights_do_not_hold_allocate_no_tensor() {
    // Sizes that libtorch would allocate (0.1 to 0.5 GB, randomly initialised, so resident)
    // before finding that the weights do not fit, were the config not checked against the
    // weights first; each must be refused with the model's memory never allocated.
    let _serial = one_at_a_time();
    let dir = tiny_folder();
    let cfg = dir.path().join("config.json");
    let good = std::fs::read_to_string(&cfg).unwrap();
    let weights = std::fs::metadata(dir.path().join("model.safetensors"))
        .unwrap()
        .len() as usize;
    model::load(dir.path(), tch::Device::Cpu).unwrap(); // libtorch's first-call costs, before
    for (key, value) in [
        ("vocab_size", 1u64 << 22),
        ("intermediate_size", 1 << 20),
        ("num_hidden_layers", 20_000),
        ("hidden_size", 1 << 18),
        ("head_dim", 1 << 20),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        v[key] = value.into();
        std::fs::write(&cfg, v.to_string()).unwrap();
        let (r, held) = guarded(|| model::load(dir.path(), tch::Device::Cpu).err());
        assert!(
            held.resident.is_some() || !cfg!(target_os = "linux"),
            "/proc/self/clear_refs or /proc/self/status unreadable: resident memory not measured"
        );
        if let Some(rss) = held.resident {
            assert!(
                rss <= resident_bound(weights),
                "{key} = {value}: resident memory grew by {rss} bytes before the refusal"
            );
        }
        let err = r.expect("no panic").expect("refused").to_string();
        assert!(err.contains(&format!("key '{key}'")), "{err}");
    }
}
