//! Schemas poem-openapi's derives cannot say: a value that is one of several
//! JSON types (a string or an array, a number or a string), and a union
//! tagged by a field whose variants share a Rust type. poem-openapi's
//! `Union` declares `type: object` beside such an `anyOf`, which no string or
//! array can match, and names a tagged variant after its Rust type (so two
//! tags of one type collide). These impls parse with serde (as the routes do)
//! and declare a schema that the accepted values match.
use poem_openapi::registry::{MetaSchema, MetaSchemaRef};

/// `T::schema_ref()` for an array whose items are bounded to `min..=max`.
pub fn int_items(min: f64, max: f64, min_items: usize) -> MetaSchemaRef {
    MetaSchemaRef::Inline(Box::new(MetaSchema {
        items: Some(Box::new(MetaSchemaRef::Inline(Box::new(MetaSchema {
            minimum: Some(min),
            maximum: Some(max),
            ..MetaSchema::new_with_format("integer", "int64")
        })))),
        min_items: Some(min_items),
        ..MetaSchema::new("array")
    }))
}

/// Implements poem-openapi's `Type`, `ParseFromJSON` and `ToJSON` for an
/// untagged serde enum: the schema is `anyOf` the listed schemas (one or
/// more per variant, with the bounds the routes check), with no `type` of
/// its own.
macro_rules! untagged_union {
    ($ty:ident, $name:literal, $desc:literal, { $($var:ident($inner:ty)),+ $(,)? }, [ $($schema:expr),+ $(,)? ]) => {
        impl poem_openapi::types::Type for $ty {
            const IS_REQUIRED: bool = true;
            type RawValueType = Self;
            type RawElementValueType = Self;

            fn name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }

            fn schema_ref() -> poem_openapi::registry::MetaSchemaRef {
                poem_openapi::registry::MetaSchemaRef::Reference($name.into())
            }

            fn register(registry: &mut poem_openapi::registry::Registry) {
                registry.create_schema::<Self, _>($name.into(), |registry| {
                    $(<$inner as poem_openapi::types::Type>::register(registry);)+
                    poem_openapi::registry::MetaSchema {
                        description: Some($desc),
                        any_of: vec![$($schema),+],
                        ..poem_openapi::registry::MetaSchema::ANY
                    }
                });
            }

            fn as_raw_value(&self) -> Option<&Self::RawValueType> {
                Some(self)
            }

            fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
                Box::new(self.as_raw_value().into_iter())
            }
        }

        impl poem_openapi::types::ParseFromJSON for $ty {
            fn parse_from_json(value: Option<serde_json::Value>) -> poem_openapi::types::ParseResult<Self> {
                serde_json::from_value(value.unwrap_or_default()).map_err(poem_openapi::types::ParseError::custom)
            }
        }

        impl poem_openapi::types::ToJSON for $ty {
            fn to_json(&self) -> Option<serde_json::Value> {
                match self {
                    $($ty::$var(v) => poem_openapi::types::ToJSON::to_json(v),)+
                }
            }
        }
    };
}

/// Implements poem-openapi's `Type`, `ParseFromJSON` and `ToJSON` for a serde
/// enum tagged by `$tag`: one component per tag value (`{Name}_{tag value}`:
/// the tag as a one-value enum, all of the variant's object), and the union
/// `oneOf` them with a discriminator.
macro_rules! tagged_union {
    ($ty:ident, $name:literal, $desc:literal, $tag:literal, { $($var:ident($inner:ty) = $value:literal),+ $(,)? }) => {
        impl poem_openapi::types::Type for $ty {
            const IS_REQUIRED: bool = true;
            type RawValueType = Self;
            type RawElementValueType = Self;

            fn name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }

            fn schema_ref() -> poem_openapi::registry::MetaSchemaRef {
                poem_openapi::registry::MetaSchemaRef::Reference($name.into())
            }

            fn register(registry: &mut poem_openapi::registry::Registry) {
                use poem_openapi::registry::{MetaDiscriminatorObject, MetaSchema, MetaSchemaRef};
                registry.create_schema::<Self, _>($name.into(), |registry| {
                    let mut one_of = Vec::new();
                    let mut mapping = Vec::new();
                    $(
                        <$inner as poem_openapi::types::Type>::register(registry);
                        let component = format!("{}_{}", $name, $value);
                        let tag = MetaSchema {
                            required: vec![$tag],
                            properties: vec![(
                                $tag,
                                MetaSchemaRef::Inline(Box::new(MetaSchema {
                                    enum_items: vec![$value.into()],
                                    example: Some($value.into()),
                                    ..MetaSchema::new("string")
                                })),
                            )],
                            ..MetaSchema::new("object")
                        };
                        registry.schemas.insert(
                            component.clone(),
                            MetaSchema {
                                all_of: vec![
                                    MetaSchemaRef::Inline(Box::new(tag)),
                                    <$inner as poem_openapi::types::Type>::schema_ref(),
                                ],
                                ..MetaSchema::ANY
                            },
                        );
                        mapping.push(($value.to_string(), format!("#/components/schemas/{component}")));
                        one_of.push(MetaSchemaRef::Reference(component));
                    )+
                    MetaSchema {
                        description: Some($desc),
                        one_of,
                        discriminator: Some(MetaDiscriminatorObject { property_name: $tag, mapping }),
                        ..MetaSchema::new("object")
                    }
                });
            }

            fn as_raw_value(&self) -> Option<&Self::RawValueType> {
                Some(self)
            }

            fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
                Box::new(self.as_raw_value().into_iter())
            }
        }

        impl poem_openapi::types::ParseFromJSON for $ty {
            fn parse_from_json(value: Option<serde_json::Value>) -> poem_openapi::types::ParseResult<Self> {
                serde_json::from_value(value.unwrap_or_default()).map_err(poem_openapi::types::ParseError::custom)
            }
        }

        impl poem_openapi::types::ToJSON for $ty {
            fn to_json(&self) -> Option<serde_json::Value> {
                let (tag, mut v) = match self {
                    $($ty::$var(v) => ($value, poem_openapi::types::ToJSON::to_json(v)?),)+
                };
                if let Some(o) = v.as_object_mut() {
                    o.insert($tag.to_string(), tag.into());
                }
                Some(v)
            }
        }
    };
}

/// Implements poem-openapi's `Type`, `ParseFromJSON` and `ToJSON` for a
/// serde type whose schema `$schema` (a `MetaSchema`, built with `registry`
/// in scope) is written by hand.
macro_rules! serde_schema {
    ($ty:ident, $name:literal, |$registry:ident| $schema:expr) => {
        impl poem_openapi::types::Type for $ty {
            const IS_REQUIRED: bool = true;
            type RawValueType = Self;
            type RawElementValueType = Self;

            fn name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }

            fn schema_ref() -> poem_openapi::registry::MetaSchemaRef {
                poem_openapi::registry::MetaSchemaRef::Reference($name.into())
            }

            fn register(registry: &mut poem_openapi::registry::Registry) {
                registry.create_schema::<Self, _>($name.into(), |$registry| $schema);
            }

            fn as_raw_value(&self) -> Option<&Self::RawValueType> {
                Some(self)
            }

            fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
                Box::new(self.as_raw_value().into_iter())
            }
        }

        impl poem_openapi::types::ParseFromJSON for $ty {
            fn parse_from_json(value: Option<serde_json::Value>) -> poem_openapi::types::ParseResult<Self> {
                serde_json::from_value(value.unwrap_or_default()).map_err(poem_openapi::types::ParseError::custom)
            }
        }

        impl poem_openapi::types::ToJSON for $ty {
            fn to_json(&self) -> Option<serde_json::Value> {
                serde_json::to_value(self).ok()
            }
        }
    };
}

/// `schema` that also admits `null`.
pub fn nullable(schema: MetaSchemaRef) -> MetaSchemaRef {
    schema.merge(MetaSchema { nullable: true, ..MetaSchema::ANY })
}

pub(crate) use {serde_schema, tagged_union, untagged_union};

/// A log-probability JSON can carry: -inf and NaN (a token the model gives
/// no probability, or logits that overflowed) become -9999, as OpenAI writes
/// them; JSON has no infinities and the schema says `number`.
fn finite(l: f32) -> f32 {
    if l.is_finite() {
        l
    } else {
        -9999.0
    }
}

/// `serialize_with` for a log-probability field (poem-openapi).
pub fn finite_logprob(l: &f32) -> Option<serde_json::Value> {
    Some(serde_json::json!(finite(*l)))
}

/// `serialize_with` for completions' `token_logprobs` (serde).
pub fn finite_logprobs<S: serde::Serializer>(v: &[Option<f32>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|l| l.map(finite)))
}

/// `serialize_with` for completions' `top_logprobs` (serde).
pub fn finite_top_logprobs<S: serde::Serializer>(
    v: &[Option<std::collections::HashMap<String, f32>>],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|m| m.as_ref().map(|m| m.iter().map(|(k, l)| (k.clone(), finite(*l))).collect::<std::collections::BTreeMap<_, _>>())))
}

/// Rewrites poem-openapi's nullable references into a form that OpenAPI 3.0
/// validators accept. A derived field `Option<T>` marked `nullable` whose
/// schema is a `$ref` comes out as `{nullable: true, allOf: [{$ref}, …]}`;
/// under OpenAPI 3.0.3 `nullable` only widens a `type` in the same schema, so
/// `null` still fails the `$ref`. It becomes `{anyOf: [{$ref}, {nullable:
/// true, enum: [null]}]}` (3.0.3's way to write "null"), keeping the field's
/// description and other keywords.
pub fn nullable_refs(v: &mut serde_json::Value) {
    use serde_json::{json, Value};
    match v {
        Value::Object(o) => {
            for x in o.values_mut() {
                nullable_refs(x);
            }
            let is_nullable_ref = o.get("nullable") == Some(&Value::Bool(true))
                && o.get("allOf").and_then(Value::as_array).is_some_and(|a| a.iter().any(|s| s.get("$ref").is_some()));
            if !is_nullable_ref {
                return;
            }
            o.remove("nullable");
            let parts: Vec<Value> = o
                .remove("allOf")
                .and_then(|a| if let Value::Array(a) = a { Some(a) } else { None })
                .unwrap_or_default()
                .into_iter()
                .filter_map(|mut s| {
                    if let Some(p) = s.as_object_mut() {
                        p.remove("nullable");
                        if p.is_empty() {
                            return None;
                        }
                    }
                    Some(s)
                })
                .collect();
            let value = if parts.len() == 1 { parts.into_iter().next().unwrap() } else { json!({ "allOf": parts }) };
            o.insert("anyOf".into(), json!([value, { "nullable": true, "enum": [null] }]));
        }
        Value::Array(a) => a.iter_mut().for_each(nullable_refs),
        _ => {}
    }
}

/// Sampling fields arrive as JSON numbers (f64) and are used as f32. Their
/// bounds are checked here on the f64, as the schema states them: a value
/// just past a bound (`1.0000000000000002` for `top_p`) must not round into
/// range, and one just inside an open bound (`5e-324` for `top_p`) must not
/// round out of it (it becomes the smallest positive f32). A value out of
/// range is a 400 naming the field (the routes check them again).
pub mod bounded {
    use serde::{de::Error, Deserialize, Deserializer};
    use std::collections::HashMap;

    fn check(v: f64, lo: f64, lo_open: bool, hi: f64) -> Result<f32, String> {
        let ok = if lo_open { v > lo } else { v >= lo } && v <= hi;
        if !ok {
            let (l, r) = if lo_open { ("(", "]") } else { ("[", "]") };
            let hi = if hi.is_infinite() { "inf".to_string() } else { hi.to_string() };
            return Err(format!("must be in {l}{lo}, {hi}{r}, got {v}"));
        }
        let f = v as f32;
        Ok(if lo_open && f <= lo as f32 { f32::from_bits((lo as f32).to_bits() + 1).max(f32::MIN_POSITIVE) } else { f })
    }

    fn opt<'de, D: Deserializer<'de>>(d: D, lo: f64, lo_open: bool, hi: f64) -> Result<Option<f32>, D::Error> {
        Option::<f64>::deserialize(d)?.map(|v| check(v, lo, lo_open, hi).map_err(D::Error::custom)).transpose()
    }

    /// OpenAI's `temperature`: [0, 2].
    pub fn temperature2<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
        opt(d, 0.0, false, 2.0)
    }
    /// Anthropic's `temperature`, `min_p`: [0, 1].
    pub fn unit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
        opt(d, 0.0, false, 1.0)
    }
    /// `top_p`: (0, 1].
    pub fn unit_open<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
        opt(d, 0.0, true, 1.0)
    }
    /// `repetition_penalty`: > 0.
    pub fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
        opt(d, 0.0, true, f64::INFINITY)
    }
    /// `presence_penalty`, `frequency_penalty`: [-2, 2].
    pub fn penalty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
        opt(d, -2.0, false, 2.0)
    }
    /// `logit_bias` values: [-100, 100].
    pub fn logit_bias<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HashMap<String, f32>>, D::Error> {
        let Some(m) = Option::<HashMap<String, f64>>::deserialize(d)? else { return Ok(None) };
        m.into_iter()
            .map(|(k, v)| check(v, -100.0, false, 100.0).map(|f| (k, f)).map_err(D::Error::custom))
            .collect::<Result<_, _>>()
            .map(Some)
    }
}

