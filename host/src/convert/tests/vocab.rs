//! The tokenizer a conversion writes: BPE from the vocab, the BOS post
//! processor, SentencePiece with space prefix and byte fallback.
use super::*;

#[test]
fn tokenizer_json_loads_and_encodes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let tiny = tiny_model(&p, GgmlType::Q8_0, false);
    let out = dir.path().join("out");
    convert_gguf(&p, &out, &opts()).unwrap();
    let tk = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let id = |s: &str| tiny.tokens.iter().position(|t| t == s).unwrap() as u32;
    let enc = tk
        .encode("<|im_start|>hello world 42<|im_end|>", false)
        .unwrap();
    let digits = [id("Ġ"), id("4"), id("2")];
    let mut want = vec![id("<|im_start|>"), id("hello"), id("Ġworld")];
    want.extend(digits);
    want.push(id("<|im_end|>"));
    assert_eq!(enc.get_ids(), &want[..]);
    assert_eq!(tk.decode(enc.get_ids(), true).unwrap(), "hello world 42");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["eos_token"], "<|im_end|>");
    assert_eq!(cfg["bos_token"], "<|im_start|>");
    assert!(cfg["chat_template"].as_str().unwrap().contains("im_start"));
    let gen: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(gen["eos_token_id"], 2);
}

#[test]
fn add_bos_token_becomes_template_post_processor() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let tiny = tiny_model(&p, GgmlType::Q8_0, false);
    // Flip tokenizer.ggml.add_bos_token (bool value right after key and type 7).
    let mut bytes = std::fs::read(&p).unwrap();
    let key = b"tokenizer.ggml.add_bos_token";
    let pos = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(&bytes[pos..pos + 5], &[7, 0, 0, 0, 0]);
    bytes[pos + 4] = 1;
    std::fs::write(&p, bytes).unwrap();
    let out = dir.path().join("out");
    convert_gguf(&p, &out, &opts()).unwrap();
    let tk = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let id = |s: &str| tiny.tokens.iter().position(|t| t == s).unwrap() as u32;
    assert_eq!(
        tk.encode("hello", true).unwrap().get_ids(),
        &[id("<|im_start|>"), id("hello")]
    );
    assert_eq!(tk.encode("hello", false).unwrap().get_ids(), &[id("hello")]);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["add_bos_token"], true);
}

/// SentencePiece vocab: Llama 2 style (`add_space_prefix` absent, so true: a
/// leading `▁`, stripped again on decode) and Gemma style (false); BOS added,
/// merges ranked by score, characters outside the vocab fall back to
/// `<0xXX>` byte tokens, a user-defined piece matches whole.
#[test]
fn sentencepiece_vocab_with_space_prefix_and_byte_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let s = |x: &str| GgufValue::String(x.into());
    // ids: 0 <unk>, 1 <s>, 2 </s>, 3 <0x21> ('!'), 4 ▁, 5 a, 6 b, 7 ▁a, 8 ab, 9 ▁ab,
    // 10 ▁▁ (user-defined)
    let toks = [
        "<unk>", "<s>", "</s>", "<0x21>", "\u{2581}", "a", "b", "\u{2581}a", "ab", "\u{2581}ab", "\u{2581}\u{2581}",
    ];
    let scores = [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, 0.0];
    let types = [2, 3, 3, 6, 1, 1, 1, 1, 1, 1, 4];
    let build = |prefix: Option<bool>| {
        let mut kv: Vec<(&str, GgufValue)> = vec![
            ("general.architecture", s("llama")),
            ("tokenizer.ggml.model", s("llama")),
            ("tokenizer.ggml.tokens", GgufValue::Array(GgufValueType::String, toks.iter().map(|t| s(t)).collect())),
            ("tokenizer.ggml.scores", GgufValue::Array(GgufValueType::F32, scores.iter().map(|&x| GgufValue::F32(x)).collect())),
            ("tokenizer.ggml.token_type", GgufValue::Array(GgufValueType::I32, types.iter().map(|&t| GgufValue::I32(t)).collect())),
            ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
            ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
            ("tokenizer.ggml.unknown_token_id", GgufValue::U32(0)),
        ];
        if let Some(b) = prefix {
            kv.push(("tokenizer.ggml.add_space_prefix", GgufValue::Bool(b)));
        }
        let p = dir.path().join("t.gguf");
        write_gguf(&p, 3, &kv, &[]);
        let files = super::tokenizer::build(&GgufFile::open(&p).unwrap(), None).unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, &files.tokenizer_json).unwrap();
        (files, tokenizers::Tokenizer::from_file(&path).unwrap())
    };

    let (files, tk) = build(None);
    // "▁ab▁a!": "▁a" (score -4) merges before "ab" (-5), then "▁a" + "b" -> "▁ab".
    let enc = tk.encode("ab a!", true).unwrap();
    assert_eq!(enc.get_ids(), &[1, 9, 7, 3]);
    assert_eq!(tk.decode(enc.get_ids(), true).unwrap(), "ab a!");
    assert_eq!(files.tokenizer_config["add_bos_token"], true);
    assert_eq!(files.tokenizer_config["bos_token"], "<s>");
    assert_eq!(files.bos_token_id, Some(1));

    let (_, tk) = build(Some(false));
    // "ab▁a!": no leading "▁"; "▁▁" (two spaces) is one user-defined token.
    assert_eq!(tk.encode("ab a!", false).unwrap().get_ids(), &[8, 7, 3]);
    let enc = tk.encode("a  b", false).unwrap();
    assert_eq!(enc.get_ids(), &[5, 10, 6]);
    assert_eq!(tk.decode(enc.get_ids(), false).unwrap(), "a  b");
}
