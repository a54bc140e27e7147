//! `wquant-mxfp4`: MLX mxfp4: E2M1 weights, E8M0 scale per 32 (mode `mxfp4`, no biases), as mlx-lm writes it.
//! The format lives in `rmlx-wquant-fp`; this crate only claims the mode.
use rmlx_plugin_api::{
    author::{PluginImpl, QuantImpl, Result},
    export_plugin, Manifest,
};
use rmlx_wquant_fp::MXFP4;

pub struct Plugin;

impl PluginImpl for Plugin {
    fn manifest() -> Manifest {
        Manifest::new("wquant-mxfp4", env!("CARGO_PKG_VERSION"), "MLX mxfp4: E2M1 weights, E8M0 scale per 32").weight_quants(&[MXFP4.mode])
    }
    fn weight_quant(mode: &str) -> Result<Box<dyn QuantImpl>> {
        rmlx_wquant_fp::weight_quant(MXFP4, "wquant-mxfp4", mode)
    }
}

export_plugin!(Plugin);
