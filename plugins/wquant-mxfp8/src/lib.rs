//! `wquant-mxfp8`: MLX mxfp8: E4M3 weights, E8M0 scale per 32 (mode `mxfp8`, no biases), as mlx-lm writes it.
//! The format lives in `rmlx-wquant-fp`; this crate only claims the mode.
use rmlx_plugin_api::{
    author::{PluginImpl, QuantImpl, Result},
    export_plugin, Manifest,
};
use rmlx_wquant_fp::MXFP8;

pub struct Plugin;

impl PluginImpl for Plugin {
    fn manifest() -> Manifest {
        Manifest::new("wquant-mxfp8", env!("CARGO_PKG_VERSION"), "MLX mxfp8: E4M3 weights, E8M0 scale per 32").weight_quants(&[MXFP8.mode])
    }
    fn weight_quant(mode: &str) -> Result<Box<dyn QuantImpl>> {
        rmlx_wquant_fp::weight_quant(MXFP8, "wquant-mxfp8", mode)
    }
}

export_plugin!(Plugin);
