//! Data: which tokens are targets for each record kind, packing, and the deterministic order.
use distill::config::RunConfig;
use distill::data::{self, pack, pad_each, Example, Sampler};
use distill::data::{DataConfig, DataFormat};
use distill::model::Tokenizer;
use std::path::Path;

fn tok() -> Tokenizer {
    Tokenizer::byte_level(&["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).unwrap()
}

fn cfg(train: &Path, format: DataFormat, packing: bool, seq_len: usize) -> DataConfig {
    DataConfig {
        train: train.to_path_buf(),
        validation: Some(train.to_path_buf()),
        format,
        seq_len,
        packing,
        validation_fraction: 0.0,
        max_train_tokens: None,
        max_validation_sequences: None,
        sources: vec![],
        ddk: None,
    }
}

/// The target tokens of the sequences, decoded.
fn targets(t: &Tokenizer, seqs: &[data::Sequence]) -> Vec<String> {
    seqs.iter()
        .map(|s| {
            let ids: Vec<u32> = s
                .labels
                .iter()
                .filter(|&&l| l >= 0)
                .map(|&l| l as u32)
                .collect();
            t.decode(&ids, false).unwrap()
        })
        .collect()
}

#[test]
fn prompt_response_learns_only_the_response() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.jsonl");
    std::fs::write(
        &f,
        "{\"prompt\": \"Q: 2+2?\\nA:\", \"response\": \" 4\"}\n\n{\"text\": \"plain\"}\n",
    )
    .unwrap();
    let t = tok();
    let ds = data::load(&cfg(&f, DataFormat::Jsonl, false, 32), &t, Some(256)).unwrap();
    assert_eq!(
        targets(&t, &ds.train),
        vec![" 4<|endoftext|>", "lain<|endoftext|>"]
    );
    // the labels sit one position before their token
    let s = &ds.train[0];
    let first = s.labels.iter().position(|&l| l >= 0).unwrap();
    assert_eq!(s.ids[first + 1] as i64, s.labels[first]);
}

#[test]
fn chat_messages_learn_only_the_assistant_turns() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.jsonl");
    let rec = serde_json::json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao."}]});
    std::fs::write(&f, format!("{rec}\n")).unwrap();
    let t = tok();
    let ds = data::load(&cfg(&f, DataFormat::Jsonl, false, 128), &t, Some(256)).unwrap();
    assert_eq!(
        targets(&t, &ds.train),
        vec!["Hello!<|im_end|>\nCiao.<|im_end|>\n"]
    );
    // and the whole sequence is the rendered conversation
    let n = ds.train[0].ids.iter().rposition(|&i| i != 256).unwrap() + 1;
    let text = t.decode(&ds.train[0].ids[..n], false).unwrap();
    assert_eq!(
        text,
        t.apply_chat_template(
            &serde_json::from_value::<Vec<distill::model::Message>>(rec["messages"].clone())
                .unwrap(),
            false
        )
        .unwrap()
    );
}

#[test]
fn packing_cuts_a_stream_and_labels_the_next_token() {
    let ex = vec![
        Example {
            ids: vec![1, 2, 3],
            target: vec![true, true, true],
            weight: 1.0,
        },
        Example {
            ids: vec![4, 5, 6, 7],
            target: vec![false, false, true, true],
            weight: 1.0,
        },
    ];
    let seqs = pack(&ex, 3, 0);
    assert_eq!(seqs.len(), 2); // [1 2 3] [4 5 6]; the remainder [7] is too short
    assert_eq!(seqs[0].labels, vec![2, 3, -100]);
    assert_eq!(seqs[1].labels, vec![-100, 6, -100]);
    let padded = pad_each(&ex, 5, 9);
    assert_eq!(padded[1].ids, vec![4, 5, 6, 7, 9]);
    assert_eq!(padded[1].labels, vec![-100, 6, 7, -100, -100]);
}

#[test]
fn text_files_of_a_folder_are_read_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("b.txt"), "second").unwrap();
    std::fs::write(dir.path().join("a.txt"), "first").unwrap();
    let t = tok();
    let mut c = cfg(dir.path(), DataFormat::Text, true, 64);
    c.validation = None;
    c.validation_fraction = 0.5;
    let ds = data::load(&c, &t, Some(256)).unwrap();
    let all: Vec<data::Sequence> = ds.train.iter().chain(&ds.validation).cloned().collect();
    assert_eq!(
        t.decode(&all[0].ids, false).unwrap(),
        "first<|endoftext|>second<|endoftext|>".to_string() + &"<|endoftext|>".repeat(64 - 13)
    );
}

#[test]
fn the_order_is_seeded_and_resumes_exactly() {
    let mut a = Sampler::new(10, 5);
    let seen: Vec<usize> = (0..7).flat_map(|_| a.next_batch(3)).collect(); // crosses two epochs
    let mut epoch0 = seen[..10].to_vec();
    epoch0.sort();
    assert_eq!(
        epoch0,
        (0..10).collect::<Vec<_>>(),
        "an epoch is a permutation"
    );
    assert_ne!(seen[..10], seen[10..20], "epochs are shuffled differently");
    let mut b = Sampler::new(10, 5);
    assert_eq!(
        (0..7).flat_map(|_| b.next_batch(3)).collect::<Vec<_>>(),
        seen
    );
    let mut c = Sampler::new(10, 5);
    let _ = c.next_batch(4);
    let state = c.state;
    let rest: Vec<usize> = (0..5).flat_map(|_| c.next_batch(3)).collect();
    let mut d = Sampler::new(10, 5);
    d.restore(state).unwrap();
    assert_eq!(
        (0..5).flat_map(|_| d.next_batch(3)).collect::<Vec<_>>(),
        rest
    );
    assert_ne!(
        Sampler::new(10, 6).next_batch(10),
        Sampler::new(10, 5).next_batch(10)
    );
}

#[test]
fn the_example_run_files_are_valid() {
    for f in ["examples/demo.toml", "examples/chat.toml"] {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
        let c = RunConfig::load(&p, &[]).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(!c.losses.is_empty());
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo.toml");
    let c = RunConfig::load(&p, &["optim.lr=0.125".into(), "run.steps=7".into()]).unwrap();
    assert_eq!(c.optim.lr, 0.125);
    assert_eq!(c.run.length, distill::train::options::Length::Steps(7));
}

#[test]
fn max_train_tokens_counts_tokens_and_spans_find_each_rows_documents() {
    let dir = tempfile::tempdir().unwrap();
    // three documents of 7, 11 and 13 bytes (+ EOS each): 8, 12, 14 tokens
    for (name, text) in [
        ("a.txt", "aaaaaaa"),
        ("b.txt", "bbbbbbbbbbb"),
        ("c.txt", "ccccccccccccc"),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let t = tok();
    let mut c = cfg(dir.path(), DataFormat::Text, true, 6);
    c.max_train_tokens = Some(15); // inside the second document
    let ds = data::load(&c, &t, Some(256)).unwrap();
    let ids: Vec<u32> = ds.train.iter().flat_map(|s| s.ids.clone()).collect();
    // 15 tokens exactly, cut into windows of 6 (the last padded with EOS)
    assert_eq!(ds.train.len(), 3);
    let real: usize = ds
        .train
        .iter()
        .flat_map(|s| &s.spans)
        .map(|sp| sp.len)
        .sum();
    assert_eq!(real, 15);
    assert_eq!(
        &ids[..15],
        {
            let mut v = t.encode("aaaaaaa", false).unwrap();
            v.push(256);
            v.extend(t.encode("bbbbbbb", false).unwrap());
            v
        }
        .as_slice()
    );
    // each row's spans give its documents and offsets: row 1 holds a[6..8] then b[0..4]
    let row = &ds.train[1];
    assert_eq!(row.spans.len(), 2);
    assert_eq!(
        (
            row.spans[0].example,
            row.spans[0].offset,
            row.spans[0].at,
            row.spans[0].len
        ),
        (0, 6, 0, 2)
    );
    assert_eq!(
        (
            row.spans[1].example,
            row.spans[1].offset,
            row.spans[1].at,
            row.spans[1].len
        ),
        (1, 0, 2, 4)
    );
    // weights: 1 where the label counts, 0 elsewhere
    for s in &ds.train {
        for (l, w) in s.labels.iter().zip(&s.weights) {
            assert_eq!(*w, if *l == data::IGNORE_INDEX { 0.0 } else { 1.0 });
        }
    }
}
