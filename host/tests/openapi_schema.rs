//! The hand-written parts of the OpenAPI document (api/types/schema.rs): a
//! nullable `$ref` that OpenAPI 3.0 validators accept `null` for, and
//! sampling bounds checked on the JSON number before it is rounded to f32.
//! (tests/api/test_openapi_contract.py checks the whole document and a live
//! server.)
use rmlx::api::types::schema::{bounded, nullable_refs};
use serde_json::json;

#[test]
fn a_nullable_ref_admits_null_beside_the_ref() {
    let mut v = json!({"properties": {"stop": {"nullable": true, "description": "d",
        "allOf": [{"$ref": "#/components/schemas/StopSpec"}, {"nullable": true}]}}});
    nullable_refs(&mut v);
    assert_eq!(
        v["properties"]["stop"],
        json!({"description": "d", "anyOf": [{"$ref": "#/components/schemas/StopSpec"}, {"nullable": true, "enum": [null]}]})
    );
    let mut plain = json!({"type": "string", "nullable": true});
    nullable_refs(&mut plain);
    assert_eq!(plain, json!({"type": "string", "nullable": true}));
}

#[derive(Debug, serde::Deserialize)]
struct Sampling {
    #[serde(default, deserialize_with = "bounded::unit_open")]
    top_p: Option<f32>,
    #[serde(default, deserialize_with = "bounded::temperature2")]
    temperature: Option<f32>,
}

#[test]
fn bounds_are_checked_before_rounding_to_f32() {
    let p = |s: &str| serde_json::from_str::<Sampling>(s);
    // just inside an open bound: not rounded out of range
    assert!(p(r#"{"top_p": 5e-324}"#).unwrap().top_p.unwrap() > 0.0);
    // just past a closed bound: not rounded into range
    assert!(p(r#"{"top_p": 1.0000000000000002}"#).is_err());
    assert!(p(r#"{"temperature": 2.0000000000000004}"#).is_err());
    assert!(p(r#"{"temperature": -5e-324}"#).is_err());
    assert_eq!(p(r#"{"temperature": 2, "top_p": null}"#).unwrap().temperature, Some(2.0));
}

#[test]
fn the_document_has_no_object_type_beside_a_union_of_other_types() {
    let doc: serde_json::Value = serde_json::from_str(&rmlx::api::openapi_json()).unwrap();
    for name in ["PromptSpec", "StopSpec", "KeepAliveSpec", "MessageContent", "ToolChoice", "AnthropicSystemParam", "AnthropicMessageContentParam"] {
        let s = &doc["components"]["schemas"][name];
        assert!(s["anyOf"].is_array(), "{name}: {s}");
        assert!(s.get("type").is_none(), "{name} declares a type beside its anyOf: {s}");
    }
    let roles: Vec<&str> = doc["components"]["schemas"]["ChatMessage"]["discriminator"]["mapping"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(roles.len(), 5);
    assert!(roles.iter().all(|r| roles.iter().filter(|x| *x == r).count() == 1), "one component per role: {roles:?}");
}
