//! `arch-bert`: BERT-family encoders for embeddings (bert.rs: `bert`,
//! `roberta`, `xlm-roberta`). They return the final hidden states when the
//! host asks for them (`Output::Hidden`); an encoder has no LM head, so a
//! request for logits is refused.
mod bert;
mod layers;

use rmlx_plugin_api::{
    author::{ModelImpl, PluginImpl, Result, Weights},
    export_plugin, Manifest, PluginError,
};

pub struct ArchBert;

const TYPES: [&str; 3] = ["bert", "roberta", "xlm-roberta"];

impl PluginImpl for ArchBert {
    fn manifest() -> Manifest {
        Manifest::new("arch-bert", env!("CARGO_PKG_VERSION"), "BERT-family encoders for embeddings (bert, roberta, xlm-roberta)")
            .architectures(&TYPES)
    }
    fn load_model(model_type: &str, config: &str, w: &mut Weights<'_, '_>) -> Result<Box<dyn ModelImpl>> {
        match model_type {
            t if TYPES.contains(&t) => Ok(Box::new(bert::Bert::load(t, config, w)?)),
            other => Err(PluginError::unsupported(format!("arch-bert does not build {other}"))),
        }
    }
    fn check_config(model_type: &str, config: &str) -> Result<()> {
        match model_type {
            t if TYPES.contains(&t) => bert::Config::parse(t, config).map(|_| ()),
            other => Err(PluginError::unsupported(format!("arch-bert does not build {other}"))),
        }
    }
}

export_plugin!(ArchBert);
