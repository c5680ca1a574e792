//! Long texts are encoded in pieces, so that memory is that of one piece: the ids must equal those
//! of the whole text, for every pre-tokenizer that allows pieces, on real text and on strings made to
//! break a wrong split rule (whitespace runs, newlines, digits, unicode, CRLF, special tokens).
mod common;
use common::{demo_teacher, demo_texts};
use distill::model::gguf::GgufFile;
use distill::model::tokenizer::{split_for_encoding, PIECE_BYTES};
use distill::model::Tokenizer;
use serde_json::{json, Value};
use std::path::Path;

fn demo_tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(&GgufFile::open(&demo_teacher()).unwrap()).unwrap()
}

/// The demo teacher's `tokenizer.json` with some parts replaced.
fn edited(base: &Tokenizer, edit: impl Fn(&mut Value)) -> Tokenizer {
    let mut tj: Value = serde_json::from_str(base.json()).unwrap();
    edit(&mut tj);
    Tokenizer::from_json(tj.to_string(), None, Path::new("<edited tokenizer.json>")).unwrap()
}

fn byte_level(regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex})
}

fn split_then_bytes(regex: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        byte_level(false)]})
}

// the split patterns of Llama 3's and Qwen2's tokenizer.json files
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The demo teacher's vocabulary and merges under every accepted pre-tokenizer, a normaliser, and a
/// post-processor that adds ids before and after the text; and the byte-level toy tokenizer.
fn variants() -> Vec<(&'static str, Tokenizer)> {
    let base = demo_tokenizer();
    let (start, end) = (
        base.token_to_id("<|im_start|>").unwrap(),
        base.token_to_id("<|im_end|>").unwrap(),
    );
    let template = json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            "<|im_start|>": {"id": "<|im_start|>", "ids": [start], "tokens": ["<|im_start|>"]},
            "<|im_end|>": {"id": "<|im_end|>", "ids": [end], "tokens": ["<|im_end|>"]}}});
    vec![
        (
            "gpt2",
            edited(&base, |tj| tj["pre_tokenizer"] = byte_level(true)),
        ),
        (
            "llama-bpe",
            edited(&base, |tj| tj["pre_tokenizer"] = split_then_bytes(LLAMA3)),
        ),
        (
            "qwen2 with NFC",
            edited(&base, |tj| {
                tj["pre_tokenizer"] = split_then_bytes(QWEN2);
                tj["normalizer"] = json!({"type": "NFC"});
            }),
        ),
        (
            "smollm with ids added before and after",
            edited(&base, |tj| tj["post_processor"] = template.clone()),
        ),
        (
            "byte-level toy",
            Tokenizer::byte_level(&["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).unwrap(),
        ),
        ("smollm (the demo teacher's GGUF)", base),
    ]
}

/// Encode in pieces of each size, with and without special tokens, and compare with the whole;
/// the number of pieces that met.
fn assert_pieces_equal_whole(
    name: &str,
    tok: &Tokenizer,
    text: &str,
    piece_sizes: &[usize],
) -> usize {
    assert!(tok.encodes_in_pieces(), "{name}: does not encode in pieces");
    let mut joints = 0;
    for add in [false, true] {
        let whole = tok.encode_whole(text, add).unwrap();
        for &piece in piece_sizes {
            let n = split_for_encoding(text, piece).len();
            joints += n - 1;
            let ids = tok.encode_in_pieces(text, add, piece).unwrap();
            if ids != whole {
                let at = ids.iter().zip(&whole).take_while(|(a, b)| a == b).count();
                panic!(
                    "{name}, pieces of {piece} bytes ({n} pieces), special tokens {add}: ids differ \
                     from the whole text's at {at} of {} (whole {:?}…, pieces {:?}…) in {:?}",
                    whole.len(),
                    &whole[at..(at + 5).min(whole.len())],
                    &ids[at..(at + 5).min(ids.len())],
                    &text[..text.len().min(120)],
                );
            }
        }
    }
    joints
}

/// Strings made to break a wrong split rule, each repeated to a few kilobytes.
fn adversarial() -> Vec<String> {
    let parts = [
        format!("a{}b", " ".repeat(5000)),
        "word   \n\n   word \t\t\n x  y\t \n".into(),
        format!("{}A{}", "\n".repeat(3000), "\n ".repeat(100)),
        "x\n".into(),
        "line\n\n\nLine  \n  line\n \n".into(),
        "1234567890".into(),
        "a1 22 333 4444 55555 666666\n7777777 x88\t9 \r\n3.14159 2,718 1e10 0x1F ".into(),
        "naïve café 東京 Привет мир 🤗🚀 e\u{301}a\u{301} ﬁ ǅ ١٢٣ ½ Ⅻ ".into(),
        "word\u{a0}word\u{3000}word\u{2028}word\u{85}word \u{a0} \u{200b}x ".into(),
        "line one\r\nline two\r\n\r\n  indented\r\n\tTab\r\n".into(),
        "a\rb\r\r c \r \r\nd".into(),
        "end.\nNext!\n\n?\n  ...\n) \n".into(),
        // punctuation before newlines: llama-bpe and qwen2 join them (` ?[^\s\p{L}\p{N}]+[\r\n]*`)
        ".\n\n,\n:\n;\n!\n\n?\n)\n\"\n'\n--\n...\n\n]\n}\n\n*/\n);\n};\n\n.\r\n,\r\n".into(),
        "The end.\n\nA line, \nthen: \n\n  (a) x;\n  f(y);\n}\n\n".into(),
        "see:--\n  \nThe end.\n \nx,\n\t\n\ny!\r\n  \r\nz".into(),
        "don't can't I'm we'll they'd IT'S 'tis o'er you 're a's\n".into(),
        "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n".into(),
        "foo<|endoftext|>bar <|endoftext|> baz\n<|endoftext|>\n".into(),
    ];
    let mut all: Vec<String> = parts
        .iter()
        .map(|p| p.repeat((3000 / p.len()).max(1)))
        .collect();
    all.push(parts.concat().repeat(2));
    all
}

#[test]
fn pieces_equal_whole_text_on_adversarial_strings() {
    let texts = adversarial();
    for (name, tok) in variants() {
        let joints: usize = texts
            .iter()
            .map(|text| assert_pieces_equal_whole(name, &tok, text, &[1, 2, 3, 17, 100]))
            .sum();
        assert!(
            joints > 10_000,
            "{name}: only {joints} joints between pieces"
        );
    }
}

#[test]
fn pieces_equal_whole_text_on_shakespeare() {
    let dir = demo_texts();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    // two plays and a poem, about 350 kB
    let texts: Vec<String> = ["hamlet_gut.txt", "tempest_gut.txt", "sonnets_gut.txt"]
        .iter()
        .map(|f| {
            let p = dir.join(f);
            assert!(p.exists(), "{} missing (found {files:?})", p.display());
            String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned()
        })
        .collect();
    for (name, tok) in variants() {
        let joints: usize = texts
            .iter()
            .map(|text| assert_pieces_equal_whole(name, &tok, text, &[1, 4096]))
            .sum();
        assert!(
            joints > 10_000,
            "{name}: only {joints} joints between pieces"
        );
    }
    // `encode` itself, on a text longer than PIECE_BYTES
    let tok = demo_tokenizer();
    let long = texts.concat();
    assert!(long.len() > PIECE_BYTES);
    assert_eq!(
        tok.encode(&long, true).unwrap(),
        tok.encode_whole(&long, true).unwrap()
    );
}

#[test]
fn split_points_follow_a_letter_or_digit_before_whitespace() {
    let text = "ab cd\nef\r\ngh\tij. kl  mn 12 東京 x";
    assert_eq!(
        split_for_encoding(text, 1),
        [
            "ab",
            " cd",
            "\nef",
            "\r\ngh",
            "\tij. kl",
            "  mn",
            " 12",
            " 東京 x"
        ]
    );
    // pieces are at least the size asked (but the last), and tile the text
    for size in [1, 5, 11, 1000] {
        let pieces = split_for_encoding(text, size);
        assert_eq!(pieces.concat(), text);
        for p in &pieces[..pieces.len() - 1] {
            assert!(p.len() >= size, "{p:?} shorter than {size}");
        }
    }
    // no split point: one piece, however long
    let run = "x".repeat(10_000);
    assert_eq!(split_for_encoding(&run, 10), [run.as_str()]);
    assert!(split_for_encoding("", 10).is_empty());
}

#[test]
fn tokenizers_outside_the_proof_encode_whole() {
    let base = demo_tokenizer();
    let text = "Some words, then more words.\n".repeat(20);
    let cases: Vec<(&str, Tokenizer)> = vec![
        (
            "a whitespace pre-tokenizer",
            edited(&base, |tj| {
                tj["pre_tokenizer"] = json!({"type": "Whitespace"})
            }),
        ),
        (
            "a prefix space",
            edited(&base, |tj| {
                tj["pre_tokenizer"] = json!({"type": "ByteLevel", "add_prefix_space": true,
                    "trim_offsets": true, "use_regex": true})
            }),
        ),
        (
            "a lowercasing normaliser",
            edited(&base, |tj| tj["normalizer"] = json!({"type": "Lowercase"})),
        ),
        (
            "an added token that strips whitespace",
            edited(&base, |tj| tj["added_tokens"][0]["rstrip"] = json!(true)),
        ),
        (
            "an added token with a space",
            edited(&base, |tj| {
                tj["added_tokens"].as_array_mut().unwrap().push(
                    json!({"id": 0, "content": "then more", "single_word": false,
                        "lstrip": false, "rstrip": false, "normalized": false, "special": false}),
                )
            }),
        ),
        (
            "truncation",
            edited(&base, |tj| {
                tj["truncation"] = json!({"direction": "Right", "max_length": 8,
                    "strategy": "LongestFirst", "stride": 0})
            }),
        ),
    ];
    for (name, tok) in cases {
        assert!(!tok.encodes_in_pieces(), "{name}: encodes in pieces");
        for add in [false, true] {
            assert_eq!(
                tok.encode_in_pieces(&text, add, 1).unwrap(),
                tok.encode_whole(&text, add).unwrap(),
                "{name}"
            );
        }
    }
}
