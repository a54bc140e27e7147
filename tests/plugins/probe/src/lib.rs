//! A test plugin (architecture `rmlx_probe`) that proves the boundary works.
//! config.json's `probe` picks the behaviour:
//! - `memory_limit`: logits[0] = MLX's memory limit in MB as seen from here;
//! - `panic` / `panic_on_load`: panics in forward / at load;
//! - `mlx_error`: an invalid matmul, so MLX raises its own error;
//! - anything else: zero logits.
use mlx_rs::{ops, Array};
use rmlx_plugin_api::{
    author::{Attend, ModelImpl, PluginImpl, Result, Weights},
    export_plugin, Manifest, ModelSpec, PluginError,
};

struct Probe;

struct ProbeModel {
    mode: String,
    vocab: i32,
}

impl PluginImpl for Probe {
    fn manifest() -> Manifest {
        Manifest::new("test-probe", "0.0.1", "Test plugin for the loader").architectures(&["rmlx_probe"])
    }
    fn load_model(_t: &str, config: &str, _w: &mut Weights<'_, '_>) -> Result<Box<dyn ModelImpl>> {
        let v: serde_json::Value = serde_json::from_str(config).map_err(|e| PluginError::config(e.to_string()))?;
        let mode = v["probe"].as_str().unwrap_or("").to_string();
        if mode == "panic_on_load" {
            panic!("probe panicked while loading");
        }
        Ok(Box::new(ProbeModel { mode, vocab: v["vocab_size"].as_i64().unwrap_or(8) as i32 }))
    }
}

impl ModelImpl for ProbeModel {
    fn spec(&self) -> ModelSpec {
        ModelSpec {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 1,
            vocab_size: self.vocab as u32,
            hidden_size: 1,
            max_context: 0,
            sliding_window: vec![0].into(),
        }
    }
    fn forward(&mut self, _tokens: &Array, _attn: &mut dyn Attend) -> Result<Array> {
        let mut logits = vec![0f32; self.vocab as usize];
        match self.mode.as_str() {
            "memory_limit" => logits[0] = (mlx_rs::memory::memory_limit()? / 1_000_000) as f32,
            "panic" => panic!("probe panicked in forward"),
            "mlx_error" => {
                let a = ops::zeros::<f32>(&[2, 3])?;
                let b = ops::zeros::<f32>(&[4, 5])?;
                return Ok(a.matmul(&b)?);
            }
            _ => {}
        }
        Ok(Array::from_slice(&logits, &[1, 1, self.vocab]))
    }
}

export_plugin!(Probe);
