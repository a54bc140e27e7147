//! `arch-llama`: Llama-family architectures.
mod bitnet;
mod llama;
mod llama_eagle3;

use rmlx_plugin_api::{
    author::{ModelImpl, PluginImpl, Result, Weights},
    export_plugin, Manifest, PluginError,
};

pub struct ArchLlama;

impl PluginImpl for ArchLlama {
    fn manifest() -> Manifest {
        Manifest::new("arch-llama", env!("CARGO_PKG_VERSION"), "Llama-family decoder (llama, mistral, bitnet) and the Eagle-3 draft head")
            .architectures(&["llama", "mistral", "bitnet", "llama_eagle3", "speculator_model_eagle3"])
            // The drafter heads among them (ABI 3.6), listed as drafters too.
            .drafters(&["llama_eagle3", "speculator_model_eagle3"])
    }
    fn load_model(model_type: &str, config: &str, w: &mut Weights<'_, '_>) -> Result<Box<dyn ModelImpl>> {
        match model_type {
            "llama" | "mistral" => Ok(Box::new(llama::Llama::load(config, w)?)),
            "bitnet" => Ok(Box::new(bitnet::BitNet::load(config, w)?)),
            "llama_eagle3" | "speculator_model_eagle3" => Ok(Box::new(llama_eagle3::Eagle3::load(config, w)?)),
            other => Err(PluginError::unsupported(format!("arch-llama does not build {other}"))),
        }
    }
    fn check_config(model_type: &str, config: &str) -> Result<()> {
        match model_type {
            "bitnet" => bitnet::Config::parse(config).map(|_| ()),
            "llama_eagle3" | "speculator_model_eagle3" => llama_eagle3::Config::parse(config).map(|_| ()),
            _ => llama::Config::parse(config).map(|_| ()),
        }
    }
}

export_plugin!(ArchLlama);
