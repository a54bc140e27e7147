//! `arch-deepseek`: DeepSeek-V3-style decoders, one file per `model_type`
//! (deepseek_v3.rs, with its Multi-head Latent Attention in mla.rs and its
//! sigmoid-routed mixture of experts in moe.rs), and deepseek_v3_mtp.rs for
//! the multi-token-prediction module those checkpoints ship as one more
//! decoder layer, a drafter head.
mod deepseek_v3;
mod deepseek_v3_mtp;
mod mla;
mod moe;

use rmlx_plugin_api::{
    author::{ModelImpl, PluginImpl, Result, Weights},
    export_plugin, Manifest, PluginError,
};

pub struct ArchDeepseek;

impl PluginImpl for ArchDeepseek {
    fn manifest() -> Manifest {
        Manifest::new("arch-deepseek", env!("CARGO_PKG_VERSION"), "DeepSeek-V3 decoders (deepseek_v3: MLA, sigmoid-routed MoE) and their MTP drafter head")
            .architectures(&["deepseek_v3", "deepseek_v3_mtp"])
            // The drafter head among them (ABI 3.6), listed as a drafter too.
            .drafters(&["deepseek_v3_mtp"])
    }
    fn load_model(model_type: &str, config: &str, w: &mut Weights<'_, '_>) -> Result<Box<dyn ModelImpl>> {
        match model_type {
            "deepseek_v3" => Ok(Box::new(deepseek_v3::DeepseekV3::load(config, w)?)),
            "deepseek_v3_mtp" => Ok(Box::new(deepseek_v3_mtp::DeepseekV3Mtp::load(config, w)?)),
            other => Err(PluginError::unsupported(format!("arch-deepseek does not build {other}"))),
        }
    }
    fn check_config(model_type: &str, config: &str) -> Result<()> {
        match model_type {
            "deepseek_v3" => deepseek_v3::Config::parse(config).map(|_| ()),
            "deepseek_v3_mtp" => deepseek_v3_mtp::check(config),
            other => Err(PluginError::unsupported(format!("arch-deepseek does not build {other}"))),
        }
    }
}

export_plugin!(ArchDeepseek);
