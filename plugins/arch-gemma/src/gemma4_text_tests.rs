//! Unit tests of `gemma4_text.rs`: config parsing, defaults, refusals and the layer
//! cache layout (no weights).
use super::*;
use serde_json::Value;

/// A 6-layer config with `extra` (`,"key":value...`) over its keys.
fn cfg(extra: &str) -> Result<Config> {
    let mut c: Value = serde_json::from_str(
        r#"{"model_type":"gemma4_text","hidden_size":64,"num_hidden_layers":6,"intermediate_size":128,
           "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"global_head_dim":32,"vocab_size":256,
           "vocab_size_per_layer_input":256,"hidden_size_per_layer_input":16,"num_kv_shared_layers":2,
           "sliding_window":8,"sliding_window_pattern":3}"#,
    )
    .unwrap();
    if !extra.is_empty() {
        let over: Value = serde_json::from_str(&format!("{{{}}}", &extra[1..])).unwrap();
        for (k, v) in over.as_object().unwrap() {
            c[k] = v.clone();
        }
    }
    Config::parse(&c.to_string())
}

#[test]
fn layers_sizes_and_shared_sources() {
    let c = cfg(r#","attention_k_eq_v":true,"num_global_key_value_heads":1"#).unwrap();
    assert_eq!((0..6).map(|i| c.window(i)).collect::<Vec<_>>(), [8, 8, 0, 8, 8, 0]);
    assert_eq!((0..6).map(|i| c.head_dim(i)).collect::<Vec<_>>(), [16, 16, 32, 16, 16, 32]);
    assert_eq!((0..6).map(|i| c.kv_heads(i)).collect::<Vec<_>>(), [2, 2, 1, 2, 2, 1]);
    // Layers 4 (sliding) and 5 (global) read layers 3 and 2.
    assert_eq!((0..6).map(|i| c.kv_source(i).unwrap()).collect::<Vec<_>>(), [0, 1, 2, 3, 3, 2]);
}

#[test]
fn mlx_lm_defaults_apply() {
    let c = Config::parse(r#"{"model_type":"gemma4_text"}"#).unwrap();
    assert_eq!((c.hidden_size, c.num_hidden_layers, c.head_dim, c.global_head_dim), (1536, 35, 256, Some(512)));
    assert_eq!((c.num_kv_shared_layers, c.hidden_size_per_layer_input, c.final_logit_softcapping), (20, Some(256), Some(30.0)));
    assert!(c.is_global(4) && !c.is_global(3));
}

#[test]
fn refuses_what_it_does_not_implement_by_name() {
    let err = |extra: &str| cfg(extra).unwrap_err().message.to_string();
    assert!(err(r#","layer_types":["sliding_attention"]"#).contains("layer_types has 1 entries"));
    assert!(err(r#","layer_types":["chunked_attention","sliding_attention","full_attention","sliding_attention","sliding_attention","full_attention"]"#)
        .contains("layer_types[0] `chunked_attention`"));
    let e = err(r#","num_kv_shared_layers":6"#);
    assert!(e.contains("num_kv_shared_layers 6"), "{e}");
    assert!(err(r#","num_kv_shared_layers":4"#).contains("no earlier layer of its type"));
    assert!(err(r#","enable_moe_block":true"#).contains("num_experts"));
    assert!(err(r#","hidden_activation":"silu""#).contains("hidden_activation"));
    assert!(err(r#","vocab_size_per_layer_input":128"#).contains("vocab_size_per_layer_input"));
    assert!(err(r#","rope_parameters":{"full_attention":{"rope_type":"dynamic","factor":2.0}}"#).contains("dynamic"));
    assert!(err(r#","rope_parameters":{"full_attention":{"rope_type":"proportional","partial_rotary_factor":2.0}}"#)
        .contains("proportional RoPE"));
    assert!(err(r#","num_key_value_heads":3"#).contains("num_key_value_heads"));
    assert!(cfg(r#","hidden_size_per_layer_input":null,"final_logit_softcapping":null"#).is_ok());
}
