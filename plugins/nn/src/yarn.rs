//! YaRN RoPE scaling as mlx-lm's `YarnRoPE` (rope_utils.py) computes it:
//! per-frequency interpolation between the original frequencies and those
//! divided by `factor`, ramped over the dimensions whose wavelengths fall
//! between `beta_fast` and `beta_slow` rotations of the original context,
//! and an attention factor (`mscale`) applied to q and k before rotating.
//! `Rope::with_yarn` builds a `Rope` from it.
use rmlx_plugin_api::{author::Result, PluginError};
use serde_json::Value;

/// The `rope_scaling` keys mlx-lm's `initialize_rope` passes to `YarnRoPE`.
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

impl Yarn {
    /// From a `rope_scaling` object; `factor` is required (as in mlx-lm),
    /// the rest default to `YarnRoPE`'s (4096, 32, 1, 1, 0).
    pub fn from_config(cfg: &Value) -> Result<Self> {
        let num = |k: &str, default: Option<f64>| -> Result<f64> {
            match cfg.get(k) {
                None | Some(Value::Null) => {
                    default.ok_or_else(|| PluginError::config(format!("rope_scaling yarn needs `{k}`")))
                }
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| PluginError::config(format!("rope_scaling.{k} must be a number, got {v}"))),
            }
        };
        let y = Yarn {
            factor: num("factor", None)?,
            original_max_position_embeddings: num("original_max_position_embeddings", Some(4096.0))?,
            beta_fast: num("beta_fast", Some(32.0))?,
            beta_slow: num("beta_slow", Some(1.0))?,
            mscale: num("mscale", Some(1.0))?,
            mscale_all_dim: num("mscale_all_dim", Some(0.0))?,
        };
        let positive = |v: f64| v > 0.0; // NaN is not
        if ![y.factor, y.original_max_position_embeddings, y.beta_fast, y.beta_slow].into_iter().all(positive) {
            return Err(PluginError::config(format!(
                "rope_scaling yarn: factor, original_max_position_embeddings, beta_fast and beta_slow must be positive, got {y:?}"
            )));
        }
        Ok(y)
    }

    /// (the `dims / 2` frequencies, the mscale applied to q and k), in
    /// float32 as MLX computes them from mlx-lm's float64 scalars.
    pub fn freqs(&self, dims: i32, base: f64) -> (Vec<f32>, f32) {
        let d = dims as f64;
        // The dimension whose wavelength makes `rot` turns over the original context.
        let correction_dim =
            |rot: f64| d * (self.original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
        let low = correction_dim(self.beta_fast).floor().max(0.0);
        let high = correction_dim(self.beta_slow).ceil().min(d - 1.0);
        let (low, high) = (low as f32, if low == high { high + 0.001 } else { high } as f32);
        let freqs = (0..dims / 2)
            .map(|j| {
                let extra = (base as f32).powf((2 * j) as f32 / dims as f32);
                let inter = self.factor as f32 * extra;
                let ramp = ((j as f32 - low) / (high - low)).clamp(0.0, 1.0);
                let mask = 1.0 - ramp;
                (inter * extra) / (inter * mask + extra * (1.0 - mask))
            })
            .collect();
        let get = |m: f64| if self.factor <= 1.0 { 1.0 } else { 0.1 * m * self.factor.ln() + 1.0 };
        (freqs, (get(self.mscale) / get(self.mscale_all_dim)) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// gpt-oss's rope_scaling at head_dim 64 and 16, base 150000, against
    /// mlx-lm 0.32.2's `YarnRoPE._freqs` and `mscale` (printed with the dev venv).
    #[test]
    fn gpt_oss_yarn_matches_mlx_lm() {
        let cfg = serde_json::json!({"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": 4096, "truncate": false});
        let y = Yarn::from_config(&cfg).unwrap();
        let close = |got: &[f32], want: &[f32]| {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() <= 1e-6 * w.abs(), "{got:?} vs {want:?}");
            }
        };
        let (f, m) = y.freqs(64, 150000.0);
        assert_eq!(f.len(), 32);
        assert!((m - 1.3465736).abs() < 1e-6, "{m}");
        close(&f[8..16], &[19.679897, 31.6248, 51.41132, 84.80188, 142.53716, 245.72711, 439.12195, 829.09735]);
        close(&[f[0], f[31]], &[1.0, 3.3074125e6]);
        let (f, _) = y.freqs(16, 150000.0);
        close(&f, &[1.0, 4.436203, 19.679897, 128.94133, 1093.5483, 54980.29, 243903.73, 1082006.4]);
        assert!(Yarn::from_config(&serde_json::json!({"rope_type": "yarn"})).unwrap_err().message.contains("`factor`"));
    }
}
