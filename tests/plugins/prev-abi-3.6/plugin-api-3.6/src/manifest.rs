//! What a plugin is and what it provides.
use abi_stable::{
    std_types::{RString, RVec},
    StableAbi,
};

#[repr(C)]
#[derive(StableAbi, Debug, Clone, Default)]
pub struct Manifest {
    /// Unique id, e.g. `arch-llama`.
    pub id: RString,
    /// The plugin's own version (semver).
    pub version: RString,
    pub description: RString,
    /// `model_type`s from config.json this plugin can build (Architecture).
    pub architectures: RVec<RString>,
    /// `quantization.mode`s it can build layers for (WeightQuant); `none` is dense.
    pub weight_quants: RVec<RString>,
    /// KV-cache families it provides (KvCache).
    pub kv_families: RVec<RString>,
    /// The drafter heads among its architectures (ABI 3.6 `conditioning`):
    /// the `{model_type}_{kind}` names it registers for them.
    pub drafters: RVec<RString>,
}

impl Manifest {
    pub fn new(id: &str, version: &str, description: &str) -> Self {
        Self {
            id: id.into(),
            version: version.into(),
            description: description.into(),
            ..Default::default()
        }
    }
    pub fn architectures(mut self, names: &[&str]) -> Self {
        self.architectures = names.iter().map(|s| RString::from(*s)).collect();
        self
    }
    pub fn weight_quants(mut self, names: &[&str]) -> Self {
        self.weight_quants = names.iter().map(|s| RString::from(*s)).collect();
        self
    }
    pub fn kv_families(mut self, names: &[&str]) -> Self {
        self.kv_families = names.iter().map(|s| RString::from(*s)).collect();
        self
    }
    pub fn drafters(mut self, names: &[&str]) -> Self {
        self.drafters = names.iter().map(|s| RString::from(*s)).collect();
        self
    }
}
