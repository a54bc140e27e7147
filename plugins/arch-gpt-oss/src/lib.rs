//! `arch-gpt-oss`: OpenAI's gpt-oss decoders (gpt_oss.rs, one file named
//! after the `model_type`).
mod gpt_oss;

use rmlx_plugin_api::{
    author::{ModelImpl, PluginImpl, Result, Weights},
    export_plugin, Manifest, PluginError,
};

pub struct ArchGptOss;

impl PluginImpl for ArchGptOss {
    fn manifest() -> Manifest {
        Manifest::new("arch-gpt-oss", env!("CARGO_PKG_VERSION"), "gpt-oss decoders (gpt_oss)").architectures(&["gpt_oss"])
    }
    fn load_model(model_type: &str, config: &str, w: &mut Weights<'_, '_>) -> Result<Box<dyn ModelImpl>> {
        match model_type {
            "gpt_oss" => Ok(Box::new(gpt_oss::GptOss::load(config, w)?)),
            other => Err(PluginError::unsupported(format!("arch-gpt-oss does not build {other}"))),
        }
    }
    fn check_config(model_type: &str, config: &str) -> Result<()> {
        match model_type {
            "gpt_oss" => gpt_oss::Config::parse(config).map(|_| ()),
            other => Err(PluginError::unsupported(format!("arch-gpt-oss does not build {other}"))),
        }
    }
}

export_plugin!(ArchGptOss);
