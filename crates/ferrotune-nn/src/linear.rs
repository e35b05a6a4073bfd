//! The linear slot: a frozen weight (and bias), optionally with a LoRA adapter attached at load
//! time when the slot's path matches `target_modules` (PEFT semantics). LoRA is a property of
//! the slot, never a second copy of the model tree.
//!
//! Output: `x W^T + b + (alpha / r) * B (A x)` with A: (r, in), B: (out, r); rsLoRA uses
//! `alpha / sqrt(r)`. A is Kaiming-uniform (PEFT's `kaiming_uniform_(a = sqrt(5))`, i.e.
//! U(-1/sqrt(in), 1/sqrt(in))), B is zero, so a fresh adapter leaves the model unchanged.

use candle_core::{DType, Result, Tensor, Var};
use rand::Rng;

use crate::ops;
use crate::weights::Vb;
use crate::{splitmix64, Mode};

/// FNV-1a hash of a slot path: a stable per-slot stream for dropout masks.
fn path_hash(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Inverted dropout with a counter-based mask: element k is kept when
/// `splitmix64(seed + k) / 2^64 >= p`, and kept values are scaled by 1 / (1 - p).
fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let mask = dropout_mask(x.elem_count(), p, seed);
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

/// The multipliers of [`dropout`]'s mask for `n` elements: 0 or 1 / (1 - p).
pub fn dropout_mask(n: usize, p: f32, seed: u64) -> Vec<f32> {
    let keep = 1.0 / (1.0 - p);
    let threshold = (p as f64 * u64::MAX as f64) as u64;
    (0..n as u64)
        .map(|k| {
            if splitmix64(seed.wrapping_add(k)) >= threshold {
                keep
            } else {
                0.0
            }
        })
        .collect()
}

/// Which linear slots get an adapter (PEFT's `target_modules`).
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// A slot matches when its path equals a name or ends with `.name`.
    Names(Vec<String>),
    /// PEFT's `"all-linear"`: every linear slot except the output head.
    AllLinear,
}

impl TargetModules {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            TargetModules::AllLinear => !path.ends_with("lm_head"),
            TargetModules::Names(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
        }
    }
}

/// LoRA hyper-parameters, with PEFT's names and defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    pub use_rslora: bool,
    pub target_modules: TargetModules,
}

impl LoraConfig {
    /// The scale applied to `B A x`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

/// A trainable low-rank update. Parameters are f32 master weights whatever the base dtype.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// (r, in)
    pub a: Var,
    /// (out, r)
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
}

/// A linear slot. `path` is the checkpoint path of the module (e.g.
/// `model.layers.0.self_attn.q_proj`), which is also how PEFT names its adapter keys.
#[derive(Debug, Clone)]
pub struct Linear {
    pub path: String,
    /// (out, in)
    pub weight: Tensor,
    /// (out)
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// Load `{prefix}.weight` (out, in) and, if `bias`, `{prefix}.bias`; attach LoRA if the
    /// slot matches the builder's target modules.
    pub fn load(vb: &Vb, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get("weight", &[out_dim, in_dim])?;
        let bias = if bias {
            Some(vb.get("bias", &[out_dim])?)
        } else {
            None
        };
        Self::from_weights(vb, weight, bias)
    }

    /// Wrap already-loaded weights (e.g. GPT-2's transposed Conv1D) as a slot at `vb`'s path.
    pub fn from_weights(vb: &Vb, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let path = vb.prefix().to_string();
        let (out_dim, in_dim) = weight.dims2()?;
        let lora = match &vb.lora {
            Some(init) if init.config.target_modules.matches(&path) => {
                let cfg = &init.config;
                let bound = 1.0 / (in_dim as f64).sqrt();
                let mut rng = init.rng.borrow_mut();
                let a: Vec<f32> = (0..cfg.r * in_dim)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let a = Tensor::from_vec(a, (cfg.r, in_dim), vb.device())?;
                let b = Tensor::zeros((out_dim, cfg.r), DType::F32, vb.device())?;
                Some(LoraAdapter {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                    scale: cfg.scale(),
                    dropout: cfg.lora_dropout,
                })
            }
            _ => None,
        };
        Ok(Linear {
            path,
            weight,
            bias,
            lora,
        })
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// x: (..., in) -> (..., out).
    ///
    /// Outside training (`!mode.train`: rollouts, evaluation, reference and old log-probs) the
    /// trainable tensors are read detached, so no autograd graph is built: a graph would keep
    /// every activation of the forward alive, and through the KV cache those of every decoding
    /// step before it.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let view = |t: &Tensor| if mode.train { t.clone() } else { t.detach() };
        let weight = view(&self.weight);
        let bias = self.bias.as_ref().map(view);
        let l = match &self.lora {
            Some(l) if mode.adapters => l,
            _ => return ops::linear(x, &weight, bias.as_ref()),
        };
        let (a, b) = (view(l.a.as_tensor()), view(l.b.as_tensor()));
        let drop = (mode.train && l.dropout > 0.0)
            .then(|| (l.dropout, mode.dropout_seed ^ path_hash(&self.path)));
        let frozen = !weight.track_op() && !bias.as_ref().is_some_and(|b| b.track_op());
        if x.device().is_cpu() && frozen {
            // One op for base + adapter: no (..., out) intermediate, no add, no graph nodes
            // for the small products.
            let lora = ops::LoraParts {
                a: &a,
                b: &b,
                scale: l.scale,
                dropout: drop,
            };
            return ops::lora_linear(x, &weight, bias.as_ref(), &lora);
        }
        let y = ops::linear(x, &weight, bias.as_ref())?;
        let xd = match drop {
            Some((p, seed)) => dropout(x, p, seed)?,
            None => x.clone(),
        };
        let a = a.to_dtype(x.dtype())?;
        // (..., r); then scale the small (out, r) B rather than the (..., out) output.
        let xa = ops::linear(&xd, &a, None)?;
        let b_scaled = (b * l.scale)?.to_dtype(x.dtype())?;
        let xab = ops::linear(&xa, &b_scaled, None)?; // (..., out)
        y + xab
    }
}
