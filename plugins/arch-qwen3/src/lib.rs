//! `arch-qwen3`: the Qwen decoders, one file per `model_type`
//! (qwen2.rs for Qwen2 / Qwen2.5, qwen2_5_vl.rs for Qwen2.5-VL with its
//! vision tower in qwen2_5_vl_vision.rs, qwen3.rs for Qwen3, qwen3_moe.rs for
//! Qwen3-MoE, qwen3_next.rs for the Qwen3-Next gated DeltaNet hybrid,
//! qwen3_5.rs and qwen3_5_moe.rs for the Qwen3.5 / 3.6 hybrids' text models,
//! qwen3_5_mtp.rs for their multi-token-prediction head, a drafter head,
//! qwen3_dflash.rs for the DFlash block-diffusion drafter, another,
//! qwen3_vl.rs for Qwen3-VL with its vision tower in qwen3_vl_vision.rs),
//! hybrid.rs for the gated DeltaNet hybrid qwen3_next and qwen3_5 share
//! (its settings and model; its layers in hybrid_attention.rs,
//! hybrid_delta.rs and hybrid_block.rs), and multimodal.rs and
//! vision_tower.rs for what qwen2_5_vl and qwen3_vl share (the tower's loading, the media forward's input and
//! multimodal RoPE; the vision towers' patches, 2-D RoPE and checks).
mod hybrid;
mod hybrid_attention;
mod hybrid_block;
mod hybrid_delta;
mod multimodal;
mod qwen2;
mod qwen2_5_vl;
pub mod qwen2_5_vl_vision;
mod qwen3;
mod qwen3_5;
mod qwen3_5_moe;
mod qwen3_5_mtp;
mod qwen3_dflash;
mod qwen3_moe;
mod qwen3_next;
mod qwen3_vl;
pub mod qwen3_vl_vision;
#[cfg(test)]
mod test_weights;
#[cfg(test)]
mod vision_golden;
mod vision_tower;

use rmlx_plugin_api::{
    author::{ModelImpl, PluginImpl, Result, Weights},
    export_plugin, Manifest, PluginError,
};

pub struct ArchQwen;

impl PluginImpl for ArchQwen {
    fn manifest() -> Manifest {
        Manifest::new("arch-qwen3", env!("CARGO_PKG_VERSION"), "Qwen decoders (qwen2, qwen2_5_vl with images, qwen3, qwen3_moe, qwen3_next, qwen3_5, qwen3_5_moe, qwen3_vl with images), the Qwen3.5 MTP drafter head, the DFlash drafter (qwen3_dflash)")
            .architectures(&["qwen2", "qwen2_5_vl", "qwen3", "qwen3_moe", "qwen3_next", "qwen3_5", "qwen3_5_moe", "qwen3_5_mtp", "qwen3_5_moe_mtp", "qwen3_dflash", "qwen3_vl"])
            // The drafter heads among them (ABI 3.6: models that name the
            // verifier layers they condition on), listed as drafters too.
            .drafters(&["qwen3_5_mtp", "qwen3_5_moe_mtp", "qwen3_dflash"])
    }
    fn load_model(model_type: &str, config: &str, w: &mut Weights<'_, '_>) -> Result<Box<dyn ModelImpl>> {
        match model_type {
            "qwen2" => Ok(Box::new(qwen2::Qwen2::load(config, w)?)),
            "qwen2_5_vl" => Ok(Box::new(qwen2_5_vl::Qwen25Vl::load(config, w)?)),
            "qwen3" => Ok(Box::new(qwen3::Qwen3::load(config, w)?)),
            "qwen3_moe" => Ok(Box::new(qwen3_moe::Qwen3Moe::load(config, w)?)),
            "qwen3_next" => Ok(Box::new(qwen3_next::load(config, w)?)),
            "qwen3_5" => Ok(Box::new(qwen3_5::load(config, w)?)),
            "qwen3_5_moe" => Ok(Box::new(qwen3_5_moe::load(config, w)?)),
            "qwen3_5_mtp" | "qwen3_5_moe_mtp" => Ok(Box::new(qwen3_5_mtp::Qwen3_5Mtp::load(model_type, config, w)?)),
            "qwen3_dflash" => Ok(Box::new(qwen3_dflash::Qwen3DFlash::load(config, w)?)),
            "qwen3_vl" => Ok(Box::new(qwen3_vl::Qwen3Vl::load(config, w)?)),
            other => Err(PluginError::unsupported(format!("arch-qwen3 does not build {other}"))),
        }
    }
    fn check_config(model_type: &str, config: &str) -> Result<()> {
        match model_type {
            "qwen2" => qwen2::Config::parse(config).map(|_| ()),
            "qwen2_5_vl" => qwen2_5_vl::check(config),
            "qwen3" => qwen3::Config::parse(config).map(|_| ()),
            "qwen3_moe" => qwen3_moe::Config::parse(config).map(|_| ()),
            "qwen3_next" => qwen3_next::Config::parse(config).map(|_| ()),
            "qwen3_5" => qwen3_5::Config::parse(config, "qwen3_5").map(|_| ()),
            "qwen3_5_moe" => qwen3_5::Config::parse(config, "qwen3_5_moe").map(|_| ()),
            "qwen3_5_mtp" | "qwen3_5_moe_mtp" => qwen3_5_mtp::check(model_type, config),
            "qwen3_dflash" => qwen3_dflash::check(config),
            "qwen3_vl" => qwen3_vl::check(config),
            other => Err(PluginError::unsupported(format!("arch-qwen3 does not build {other}"))),
        }
    }
}

export_plugin!(ArchQwen);
