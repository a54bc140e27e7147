//! `wquant-nvfp4`: MLX nvfp4: E2M1 weights, E4M3 scale per 16 (mode `nvfp4`, no biases), as mlx-lm writes it.
//! The format lives in `rmlx-wquant-fp`; this crate only claims the mode.
use rmlx_plugin_api::{
    author::{PluginImpl, QuantImpl, Result},
    export_plugin, Manifest,
};
use rmlx_wquant_fp::NVFP4;

pub struct Plugin;

impl PluginImpl for Plugin {
    fn manifest() -> Manifest {
        Manifest::new("wquant-nvfp4", env!("CARGO_PKG_VERSION"), "MLX nvfp4: E2M1 weights, E4M3 scale per 16").weight_quants(&[NVFP4.mode])
    }
    fn weight_quant(mode: &str) -> Result<Box<dyn QuantImpl>> {
        rmlx_wquant_fp::weight_quant(NVFP4, "wquant-nvfp4", mode)
    }
}

export_plugin!(Plugin);
