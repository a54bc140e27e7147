//! `arch-gemma`: the Gemma decoders, one file per `model_type`
//! (gemma3_text.rs for Gemma 3's text models, gemma4_text.rs for Gemma 4's,
//! gemma3.rs for Gemma 3 with images: siglip.rs's vision tower, the
//! projector and gemma3_text's language model; gemma4.rs for Gemma 4 with
//! images: gemma4_vision.rs's encoder, the embedder and gemma4_text's
//! language model).
mod gemma3;
mod gemma3_text;
mod gemma4;
mod gemma4_text;
mod gemma4_vision;
mod siglip;

use rmlx_plugin_api::{
    author::{ModelImpl, PluginImpl, Result, Weights},
    export_plugin, Manifest, PluginError,
};

pub struct ArchGemma;

impl PluginImpl for ArchGemma {
    fn manifest() -> Manifest {
        Manifest::new("arch-gemma", env!("CARGO_PKG_VERSION"), "Gemma decoders (gemma3_text, gemma4_text; gemma3 with its SigLIP vision tower, gemma4 with its vision encoder)")
            .architectures(&["gemma3_text", "gemma4_text", "gemma3", "gemma4"])
    }
    fn load_model(model_type: &str, config: &str, w: &mut Weights<'_, '_>) -> Result<Box<dyn ModelImpl>> {
        match model_type {
            "gemma3_text" => Ok(Box::new(gemma3_text::Gemma3Text::load(config, w)?)),
            "gemma4_text" => Ok(Box::new(gemma4_text::Gemma4Text::load(config, w)?)),
            "gemma3" => Ok(Box::new(gemma3::Gemma3::load(config, w)?)),
            "gemma4" => Ok(Box::new(gemma4::Gemma4::load(config, w)?)),
            other => Err(PluginError::unsupported(format!("arch-gemma does not build {other}"))),
        }
    }
    fn check_config(model_type: &str, config: &str) -> Result<()> {
        match model_type {
            "gemma3_text" => gemma3_text::Config::parse(config).map(|_| ()),
            "gemma4_text" => gemma4_text::Config::parse(config).map(|_| ()),
            "gemma3" => gemma3::Config::parse(config).map(|_| ()),
            "gemma4" => gemma4::Config::parse(config).map(|_| ()),
            other => Err(PluginError::unsupported(format!("arch-gemma does not build {other}"))),
        }
    }
}

export_plugin!(ArchGemma);
