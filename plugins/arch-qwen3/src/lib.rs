//! `arch-qwen3`: Qwen3 dense decoder.
mod qwen3;

use rmlx_plugin_api::{
    author::{ModelImpl, PluginImpl, Result, Weights},
    export_plugin, Manifest, PluginError,
};

pub struct ArchQwen3;

impl PluginImpl for ArchQwen3 {
    fn manifest() -> Manifest {
        Manifest::new("arch-qwen3", env!("CARGO_PKG_VERSION"), "Qwen3 dense decoder")
            .architectures(&["qwen3"])
    }
    fn load_model(model_type: &str, config: &str, w: &mut Weights<'_, '_>) -> Result<Box<dyn ModelImpl>> {
        match model_type {
            "qwen3" => Ok(Box::new(qwen3::Qwen3::load(config, w)?)),
            other => Err(PluginError::unsupported(format!("arch-qwen3 does not build {other}"))),
        }
    }
}

export_plugin!(ArchQwen3);
