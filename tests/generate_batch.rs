//! Batched generation with a KV cache (`generate_batch`) against plain greedy decoding without a
//! cache (a full forward over the prompt and the tokens so far, each step), and the on-device
//! nucleus sampler (`pick`) against the nucleus computed in f64 on the host.
use distill::generate::{generate, generate_batch, pick, Finish, GenerateOptions};
use distill::model::{self, LlamaConfig, LoadedModel};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// `model::random` seeds libtorch's global generator: one model at a time across test threads.
static SEEDING: Mutex<()> = Mutex::new(());

const SCALE: f64 = 4.0;

fn tiny(context: usize, seed: i64) -> LoadedModel {
    let _g = SEEDING.lock().unwrap_or_else(|e| e.into_inner());
    let mut cfg = LlamaConfig::tiny(64, 32, 2, 4, 2);
    cfg.max_position_embeddings = context;
    // an untied head: a tied one makes a random model repeat its last token
    cfg.tie_word_embeddings = false;
    let m = model::random(&cfg, Device::Cpu, seed).unwrap();
    // logits spread over a few units, so that greedy choices are rarely near ties and sampling
    // has several likely tokens
    tch::no_grad(|| {
        let e = m.vs.variables()["lm_head.weight"].shallow_clone();
        let _ = e.shallow_clone().f_mul_scalar_(SCALE).unwrap();
    });
    m
}

fn prompts() -> Vec<Vec<u32>> {
    let lens = [3usize, 7, 1, 12];
    lens.iter()
        .enumerate()
        .map(|(r, &n)| (0..n).map(|k| ((13 * r + 7 * k + 5) % 64) as u32).collect())
        .collect()
}

fn greedy(max_new: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: max_new,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        stop_ids: vec![],
    }
}

/// Greedy decoding without a cache: the tokens, and at each step the gap between the best and
/// the second-best logit (a step whose gap is within f32 rounding may go either way).
fn uncached(m: &LoadedModel, prompt: &[u32], max_new: usize, stop: &[u32]) -> (Vec<u32>, Vec<f64>) {
    let context = m.model.config.max_position_embeddings;
    let mut ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let (mut out, mut gaps) = (vec![], vec![]);
    tch::no_grad(|| {
        while out.len() < max_new && ids.len() <= context {
            let x = Tensor::from_slice(&ids).unsqueeze(0);
            let last = m.model.forward(&x).unwrap().select(1, -1).squeeze_dim(0);
            let row = Vec::<f32>::try_from(&last.to_kind(Kind::Float)).unwrap();
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            gaps.push((row[order[0]] - row[order[1]]) as f64);
            let id = order[0] as u32;
            if stop.contains(&id) {
                break;
            }
            out.push(id);
            ids.push(id as i64);
        }
    });
    (out, gaps)
}

/// The f32 rounding of a forward pass through two layers of a width-32 model, far above what a
/// different batch shape changes and far below a typical logit gap (the logits span ~10).
const TIE: f64 = 1e-3;

/// Tokens of `got` equal `want` up to the first step where `want`'s choice was within TIE of a tie;
/// returns how many were compared.
fn agree(got: &[u32], want: &[u32], gaps: &[f64]) -> usize {
    let n = gaps.iter().position(|&g| g < TIE).unwrap_or(want.len());
    let n = n.min(want.len());
    assert_eq!(&got[..n.min(got.len())], &want[..n], "the first {n} tokens");
    if n == want.len() {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    }
    n
}

#[test]
fn batched_cached_greedy_equals_uncached_greedy_and_padding_changes_nothing() {
    let m = tiny(64, 1);
    let ps = prompts();
    let max_new = 12;
    let seeds = vec![0u64; ps.len()];
    let batch = generate_batch(&m.model, &ps, &seeds, &greedy(max_new), |_, _| Ok(())).unwrap();

    let (mut compared, mut total) = (0, 0);
    for (r, p) in ps.iter().enumerate() {
        let (want, gaps) = uncached(&m, p, max_new, &[]);
        assert_eq!(want.len(), max_new);
        compared += agree(&batch[r].tokens, &want, &gaps);
        total += want.len();
        assert_eq!(batch[r].finish, Finish::Length);
        // alone (no padding) and in the batch: the same tokens
        let alone = generate(&m.model, p, &greedy(max_new), |_| Ok(())).unwrap();
        compared += agree(&alone, &want, &gaps);
        total += want.len();
    }
    // the test compared (nearly) everything: near-ties are rare
    assert!(compared * 10 >= total * 9, "{compared} of {total} compared");
}

#[test]
fn a_stop_id_ends_only_its_row_and_the_context_ends_a_long_prompt() {
    let m = tiny(16, 2);
    let ps = prompts();
    let max_new = 10;
    let (first, _) = uncached(&m, &ps[0], max_new, &[]);
    let stop = vec![first[3]];
    let opts = GenerateOptions {
        stop_ids: stop.clone(),
        ..greedy(max_new)
    };
    let mut streamed: Vec<Vec<u32>> = vec![vec![]; ps.len()];
    let out = generate_batch(&m.model, &ps, &[0; 4], &opts, |r, id| {
        streamed[r].push(id);
        Ok(())
    })
    .unwrap();
    for (r, p) in ps.iter().enumerate() {
        let (want, gaps) = uncached(&m, p, max_new, &stop);
        agree(&out[r].tokens, &want, &gaps);
        assert_eq!(
            streamed[r], out[r].tokens,
            "on_token saw each token once, in order"
        );
        // why it ended, from the reference: a stop id, the context (16 − 12 + 1 = 5 tokens for
        // the 12-token prompt), or the length
        let context_limit = 16 - p.len() + 1;
        let expected = if want.len() < max_new.min(context_limit) {
            Finish::Stop
        } else if context_limit < max_new {
            Finish::Context
        } else {
            Finish::Length
        };
        assert_eq!(out[r].finish, expected, "row {r}: {:?}", out[r]);
    }
    assert_eq!(out[0].finish, Finish::Stop);
    assert!(out[0].tokens.len() <= 3);
    assert_eq!(out[3].finish, Finish::Context);
    assert_eq!(out[3].tokens.len(), 5);
}

#[test]
fn sampling_is_reproducible_by_seed_and_independent_of_the_batch() {
    let m = tiny(64, 3);
    let ps = prompts();
    let opts = GenerateOptions {
        temperature: 1.0,
        top_p: 0.9,
        ..greedy(8)
    };
    let seeds = [11u64, 12, 13, 14];
    let a = generate_batch(&m.model, &ps, &seeds, &opts, |_, _| Ok(())).unwrap();
    let b = generate_batch(&m.model, &ps, &seeds, &opts, |_, _| Ok(())).unwrap();
    assert_eq!(a, b, "same seeds, same tokens");
    let c = generate_batch(&m.model, &ps, &[21, 22, 23, 24], &opts, |_, _| Ok(())).unwrap();
    assert_ne!(a, c, "other seeds, other tokens");
    // row 2 with its seed alone, and in a batch in another order: the same draws
    let reordered = generate_batch(
        &m.model,
        &[ps[2].clone(), ps[0].clone()],
        &[seeds[2], seeds[0]],
        &opts,
        |_, _| Ok(()),
    )
    .unwrap();
    // the logits differ between batch shapes by f32 rounding only: a draw lands that close to a
    // boundary of the nucleus's cumulative sum with probability ~1e-6 a step
    assert_eq!(reordered[0], a[2]);
    assert_eq!(reordered[1], a[0]);
}

/// The nucleus of softmax(z / T) in f64: (token, probability) in descending order, the shortest
/// prefix reaching `top_p`.
fn nucleus(z: &[f32], temperature: f64, top_p: f64) -> Vec<(usize, f64)> {
    let x: Vec<f64> = z.iter().map(|&v| v as f64 / temperature).collect();
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = x.iter().map(|v| (v - m).exp()).sum();
    let mut p: Vec<(usize, f64)> = x
        .iter()
        .enumerate()
        .map(|(i, v)| (i, (v - m).exp() / total))
        .collect();
    p.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut before = 0.0;
    let mut kept = vec![];
    for (i, q) in p {
        if before >= top_p {
            break;
        }
        kept.push((i, q));
        before += q;
    }
    kept
}

#[test]
fn the_device_sampler_draws_from_the_nucleus_by_inverse_cdf() {
    let _g = SEEDING.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(5);
    let logits = Tensor::randn([3, 50], (Kind::Float, Device::Cpu)) * 2.0;
    drop(_g);
    let rows: Vec<Vec<f32>> = (0..3)
        .map(|r| Vec::<f32>::try_from(&logits.get(r)).unwrap())
        .collect();
    for &(temperature, top_p) in &[(1.0, 0.9), (0.7, 0.5), (1.5, 1.0)] {
        // for every kept token of every row, a draw at the middle of its interval of the
        // renormalised cumulative sum picks it
        let nuclei: Vec<_> = rows
            .iter()
            .map(|z| nucleus(z, temperature, top_p))
            .collect();
        let most = nuclei.iter().map(Vec::len).max().unwrap();
        assert!(most > 1 && nuclei.iter().all(|n| n.len() < 50 || top_p == 1.0));
        for k in 0..most {
            let mut u = vec![];
            for n in &nuclei {
                let mass: f64 = n.iter().map(|x| x.1).sum();
                let k = k.min(n.len() - 1);
                let below: f64 = n[..k].iter().map(|x| x.1).sum();
                u.push((below + n[k].1 / 2.0) / mass);
            }
            let got =
                Vec::<i64>::try_from(&pick(&logits, temperature, top_p, &u).unwrap()).unwrap();
            for (r, n) in nuclei.iter().enumerate() {
                assert_eq!(
                    got[r] as usize,
                    n[k.min(n.len() - 1)].0,
                    "row {r}, token {k}, T {temperature}, top-p {top_p}"
                );
            }
        }
        // u just below 1 picks the last token of the nucleus, never one outside it
        let got =
            Vec::<i64>::try_from(&pick(&logits, temperature, top_p, &[0.999_999; 3]).unwrap())
                .unwrap();
        for (r, n) in nuclei.iter().enumerate() {
            assert_eq!(got[r] as usize, n.last().unwrap().0);
        }
    }
    // temperature 0: the argmax
    let got = Vec::<i64>::try_from(&pick(&logits, 0.0, 1.0, &[0.5; 3]).unwrap()).unwrap();
    for (r, z) in rows.iter().enumerate() {
        let best = (0..50).max_by(|&a, &b| z[a].total_cmp(&z[b])).unwrap();
        assert_eq!(got[r] as usize, best);
    }
}

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

#[test]
fn prompt_files_read_prompts_conversations_and_answers_and_name_bad_lines() {
    use distill::data::prompts;
    use distill::model::Tokenizer;
    let tok = Tokenizer::byte_level(SPECIALS).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.jsonl");
    std::fs::write(
        &file,
        concat!(
            "{\"prompt\": \"2+3=\", \"answer\": \"5\"}\n",
            "\n",
            "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Hi\"}]}\n",
        ),
    )
    .unwrap();
    let ps = prompts::read(&file, &tok, false).unwrap();
    assert_eq!(ps.len(), 2);
    assert_eq!((ps[0].line, ps[1].line), (1, 3));
    assert_eq!(ps[0].text, "2+3=");
    assert_eq!(ps[0].ids, tok.encode("2+3=", true).unwrap());
    assert_eq!(ps[0].answer.as_deref(), Some("5"));
    let want = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(ps[1].text, want);
    assert_eq!(ps[1].ids, tok.encode(want, false).unwrap());
    assert_eq!(ps[1].answer, None);
    // with chat, a plain prompt becomes a user turn
    let chat = prompts::read(&file, &tok, true).unwrap();
    assert!(
        chat[0].text.starts_with("<|im_start|>user\n2+3=<|im_end|>"),
        "{}",
        chat[0].text
    );

    let bad = |body: &str, needle: &str| {
        std::fs::write(&file, body).unwrap();
        let e = prompts::read(&file, &tok, false).unwrap_err().to_string();
        assert!(e.contains(needle) && e.contains("p.jsonl"), "{e}");
    };
    bad(
        "{\"prompt\": \"a\"}\n{\"prompt\": ",
        "p.jsonl:2: not valid JSON",
    );
    bad("{\"prompt\": \"a\", \"messages\": []}", ":1: has both");
    bad("{\"text\": \"a\"}", ":1: unknown key 'text'");
    bad("{\"prompt\": 3}", ":1: 'prompt' must be a string");
    bad(
        "{\"prompt\": \"a\", \"answer\": 5}",
        ":1: 'answer' must be a string",
    );
    bad(
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}",
        ":1: the last message is the assistant's",
    );
    bad("{\"messages\": []}", ":1: 'messages' is empty");
    bad("\n\n", "no prompts");
}
