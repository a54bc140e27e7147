//! `arch-whisper`: OpenAI's Whisper speech model in mlx-whisper's layout
//! (whisper.rs: `whisper`), an audio encoder and a text decoder in one
//! model. The host runs the encoder as a cacheless forward that asks for
//! hidden states and lends the log-mel frames as input features, and the
//! decoder as ordinary cached steps that lend the encoder's output as
//! features (see whisper.rs for the exact contract use).
mod whisper;

use rmlx_plugin_api::{
    author::{ModelImpl, PluginImpl, Result, Weights},
    export_plugin, Manifest, PluginError,
};

pub struct ArchWhisper;

impl PluginImpl for ArchWhisper {
    fn manifest() -> Manifest {
        Manifest::new("arch-whisper", env!("CARGO_PKG_VERSION"), "Whisper speech recognition (encoder-decoder, mlx-whisper layout)")
            .architectures(&["whisper"])
    }
    fn load_model(model_type: &str, config: &str, w: &mut Weights<'_, '_>) -> Result<Box<dyn ModelImpl>> {
        match model_type {
            "whisper" => Ok(Box::new(whisper::Whisper::load(config, w)?)),
            other => Err(PluginError::unsupported(format!("arch-whisper does not build {other}"))),
        }
    }
    fn check_config(model_type: &str, config: &str) -> Result<()> {
        match model_type {
            "whisper" => whisper::Config::parse(config).map(|_| ()),
            other => Err(PluginError::unsupported(format!("arch-whisper does not build {other}"))),
        }
    }
}

export_plugin!(ArchWhisper);
