//! The fixture tokenizers against transformers' encodings and decodings, the
//! stream decoder, special tokens and the BOS post-processor.
use super::*;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizers")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn stream(tok: &Tokenizer, ids: &[u32], skip: bool) -> (String, usize) {
    let mut d = tok.stream_decoder(skip);
    let mut out = String::new();
    let mut pieces = 0;
    for &id in ids {
        let s = d.step(id).unwrap();
        assert!(
            !s.contains('\u{FFFD}'),
            "streamed a replacement char: {s:?}"
        );
        if !s.is_empty() {
            pieces += 1;
        }
        out.push_str(&s);
    }
    out.push_str(&d.flush().unwrap());
    (out, pieces)
}

#[test]
fn encode_decode_match_transformers() {
    let exp = expected();
    for (model, m) in exp["models"].as_object().unwrap() {
        let tok = test_tokenizer(model);
        assert_eq!(
            tok.bos_id(),
            if model == "qwen3" {
                None
            } else {
                m["bos_token_id"].as_u64().map(|x| x as u32)
            },
            "{model} bos"
        );
        assert_eq!(
            tok.eos_token_id(),
            m["eos_token_id"].as_u64().map(|x| x as u32),
            "{model} eos"
        );
        assert_eq!(
            tok.vocab_size() as u64,
            m["vocab_size_with_added"].as_u64().unwrap(),
            "{model} vocab"
        );
        for e in m["encodings"].as_array().unwrap() {
            let text = e["text"].as_str().unwrap();
            let plain = tok.encode(text, false).unwrap();
            assert_eq!(plain, ids(&e["ids"]), "{model} encode({text:?}, false)");
            let special = tok.encode(text, true).unwrap();
            assert_eq!(
                special,
                ids(&e["ids_with_special"]),
                "{model} encode({text:?}, true)"
            );
            assert_eq!(
                tok.decode(&plain, false).unwrap(),
                e["decoded"].as_str().unwrap(),
                "{model} decode"
            );
            assert_eq!(
                tok.decode(&special, true).unwrap(),
                e["decoded_with_special_skipped"].as_str().unwrap(),
                "{model} decode skip"
            );
        }
    }
}

#[test]
fn stream_decoder_matches_full_decode() {
    let exp = expected();
    for (model, m) in exp["models"].as_object().unwrap() {
        let tok = test_tokenizer(model);
        let mut cases: Vec<Vec<u32>> = Vec::new();
        for e in m["encodings"].as_array().unwrap() {
            cases.push(ids(&e["ids"]));
            cases.push(ids(&e["ids_with_special"]));
        }
        for c in m["chat"].as_array().unwrap() {
            if let Some(x) = c.get("expected_ids") {
                cases.push(ids(x));
            }
        }
        for case in &cases {
            for skip in [false, true] {
                let full = tok.decode(case, skip).unwrap();
                let (streamed, _) = stream(&tok, case, skip);
                assert_eq!(streamed, full, "{model} skip={skip} ids={case:?}");
            }
        }
    }
}

#[test]
fn stream_decoder_holds_split_utf8() {
    // "🙂" in byte-level BPE is several tokens; nothing may be emitted mid-character.
    for model in ["qwen3", "llama3_1", "gemma3"] {
        let tok = test_tokenizer(model);
        let text = "a🙂👍🏽中文é";
        let ids = tok.encode(text, false).unwrap();
        let mut d = tok.stream_decoder(false);
        let mut out = String::new();
        for &id in &ids {
            let s = d.step(id).unwrap();
            assert!(!s.contains('\u{FFFD}'), "{model}: {s:?}");
            out.push_str(&s);
        }
        assert!(
            !d.has_pending(),
            "{model}: all text complete after the last token"
        );
        assert_eq!(out, text, "{model}");
        // A dangling partial character comes out as U+FFFD on flush, as decode shows it.
        let mut d = tok.stream_decoder(false);
        let ids = tok.encode("x中", false).unwrap();
        let full_bytes = ids.len();
        let mut out = String::new();
        for &id in &ids[..full_bytes - 1] {
            out.push_str(&d.step(id).unwrap());
        }
        out.push_str(&d.flush().unwrap());
        assert_eq!(
            out,
            tok.decode(&ids[..full_bytes - 1], false).unwrap(),
            "{model}"
        );
    }
}

#[test]
fn shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<StreamDecoder>();
    assert_send_sync::<crate::model::chat_template::ChatTemplate>();
}

#[test]
fn special_tokens_and_ids() {
    let tok = test_tokenizer("qwen3");
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(151645));
    assert_eq!(tok.id_to_token(151645).as_deref(), Some("<|im_end|>"));
    assert!(tok.is_special(151645));
    assert!(!tok.is_special(9707));
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(ids[0], 151644);
    assert_eq!(*ids.last().unwrap(), 151645);
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
    assert_eq!(tok.bos_token(), None);
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));

    let tok = test_tokenizer("gemma3");
    assert_eq!(tok.bos_token(), Some("<bos>"));
    assert_eq!(tok.bos_id(), Some(2));
    let tok = test_tokenizer("llama3_1");
    assert_eq!(tok.bos_id(), Some(128000));
    assert_eq!(tok.encode("", true).unwrap(), vec![128000]);
}

#[test]
fn add_bos_token_flag_rebuilds_post_processor() {
    // Gemma's config says add_bos_token=true; flipping it off must drop BOS, as in HF.
    let dir = fixtures().join("gemma3");
    let mut cfg: Value = read_json_opt(&dir.join("tokenizer_config.json"))
        .unwrap()
        .unwrap();
    cfg["add_bos_token"] = Value::Bool(false);
    let tok = Tokenizer::from_file_with_config(&dir.join("tokenizer.json"), Some(&cfg), None)
        .unwrap();
    assert_eq!(tok.bos_id(), None);
    assert_eq!(
        tok.encode("Hello", true).unwrap(),
        tok.encode("Hello", false).unwrap()
    );
    cfg["add_eos_token"] = Value::Bool(true);
    let tok = Tokenizer::from_file_with_config(&dir.join("tokenizer.json"), Some(&cfg), None)
        .unwrap();
    let ids = tok.encode("Hello", true).unwrap();
    assert_eq!(*ids.last().unwrap(), 106, "eos <end_of_turn> appended");
}
