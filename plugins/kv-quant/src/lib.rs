//! `rmlx-kv-quant`: the compressing KV-cache families (issue 12).
//!
//! Every family is a codec of one side of the cache (`KvCodecImpl`): its
//! pool blocks hold only the compressed components, and attention reads
//! those (scores against keys, mixing of values), never a full-precision copy.
//!
//! | family | module | bits per value (D = 128, bf16 model) |
//! |---|---|---|
//! | `fp8` | [`fp8`] | 8.125 |
//! | `q8`, `q4`, `q2` | [`affine`] | 8.5, 4.5, 2.5 |
//! | `turbo4`, `turbo3`, `turbo2` | [`turbo`] | 4.125, 3.125, 2.125 |
//! | `turbo4q`, `turbo3q` (keys) | [`turbo`] | 4.25, 3.25 |
//! | `planar4`, `planar3` | [`planar`] | 4.125, 3.125 |
//! | `iso4`, `iso3` | [`iso`] | 4.125, 3.125 |
//! | `rotor4`, `rotor3` | [`rotor`] | 4.125, 3.125 |
//! | `rotor4q`, `rotor3q` (keys) | [`rotor`] | 4.25, 3.25 |
//!
//! Small dense models lose much more than big ones with the rotation
//! families on keys (turbo3 keys: SmolLM2-135M perplexity +24%,
//! Qwen2.5-0.5B far worse); ANALYSIS.md says why (the error follows the whole
//! key norm, most of which is a component shared by every token) and what
//! works (q8 keys with turbo values; centered keys: the rotation families
//! declare the `mean` calibration that `rmlx kv-calibrate` fits).
//!
//! Shared pieces: [`pack`] (bit-plane packing), [`codebook`] (Lloyd-Max),
//! [`rotation`] (seeded rotations), [`quant`] (norm + codebook quantizer),
//! [`rotated`] (the rotation families' codec; [`rotated_gpu`] its fused
//! encode on a GPU).
pub mod affine;
pub mod codebook;
pub mod fp8;
pub mod iso;
pub mod pack;
pub mod planar;
pub mod quant;
pub mod rotated;
pub mod rotated_gpu;
pub mod rotation;
pub mod rotor;
pub mod turbo;

#[cfg(test)]
mod tests;

use rmlx_plugin_api::author::kv::KvCodecImpl;

/// Every family, as users type it.
pub const FAMILIES: &[&str] = &[
    "fp8", "q8", "q4", "q2", "turbo4", "turbo3", "turbo2", "turbo4q", "turbo3q", "planar4", "planar3", "iso4", "iso3",
    "rotor4", "rotor3", "rotor4q", "rotor3q",
];

/// The codec of family `name`, or None for a name this plugin does not have.
pub fn codec(name: &str) -> Option<Box<dyn KvCodecImpl>> {
    let c: Box<dyn KvCodecImpl> = match name {
        "fp8" => Box::new(fp8::Fp8),
        "q8" => Box::new(affine::Affine { name: "q8", bits: 8 }),
        "q4" => Box::new(affine::Affine { name: "q4", bits: 4 }),
        "q2" => Box::new(affine::Affine { name: "q2", bits: 2 }),
        "turbo4" => Box::new(turbo::turbo("turbo4", 4, false)),
        "turbo3" => Box::new(turbo::turbo("turbo3", 3, false)),
        "turbo2" => Box::new(turbo::turbo("turbo2", 2, false)),
        "turbo4q" => Box::new(turbo::turbo("turbo4q", 4, true)),
        "turbo3q" => Box::new(turbo::turbo("turbo3q", 3, true)),
        "planar4" => Box::new(planar::planar("planar4", 4)),
        "planar3" => Box::new(planar::planar("planar3", 3)),
        "iso4" => Box::new(iso::iso("iso4", 4)),
        "iso3" => Box::new(iso::iso("iso3", 3)),
        "rotor4" => Box::new(rotor::rotor("rotor4", 4, false)),
        "rotor3" => Box::new(rotor::rotor("rotor3", 3, false)),
        "rotor4q" => Box::new(rotor::rotor("rotor4q", 4, true)),
        "rotor3q" => Box::new(rotor::rotor("rotor3q", 3, true)),
        _ => return None,
    };
    Some(c)
}

/// The plugin: every family above, under the `kv_codec` entry (ABI 3.2).
pub struct KvQuant;

impl rmlx_plugin_api::author::PluginImpl for KvQuant {
    fn manifest() -> rmlx_plugin_api::Manifest {
        rmlx_plugin_api::Manifest::new(
            "kv-quant",
            env!("CARGO_PKG_VERSION"),
            "compressing KV-cache families: fp8, q8/q4/q2, turbo, planar, iso, rotor",
        )
        .kv_families(FAMILIES)
    }

    fn kv_codec(name: &str) -> rmlx_plugin_api::author::Result<Box<dyn KvCodecImpl>> {
        codec(name).ok_or_else(|| rmlx_plugin_api::PluginError::unsupported(format!("kv-quant has no family {name}")))
    }
}

rmlx_plugin_api::export_plugin!(KvQuant);
