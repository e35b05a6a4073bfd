//! Shared transformer layers for every model family: the linear slot (plain or LoRA), norms,
//! rotary embeddings, grouped-query attention, gated MLPs and the external KV cache, built on
//! the differentiable ops in [`ops`].
//!
//! Owns: layer math and parameter layout. Does not own: model families, config files, weight
//! file formats (weights arrive through [`WeightSource`]), tokenization or sampling.

pub mod attention;
pub mod kv_cache;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod ops;
pub mod rope;
pub mod weights;

pub use attention::{Attention, AttentionSpec};
pub use kv_cache::KvCache;
pub use linear::{Linear, LoraAdapter, LoraConfig, TargetModules};
pub use mlp::{GatedMlp, GeluMlp};
pub use norm::{LayerNorm, RmsNorm};
pub use rope::{RopeScaling, RotaryEmbedding};
pub use weights::{Vb, WeightSource};

/// How a forward pass runs: with or without the LoRA adapters (off = the frozen reference
/// model, used for KL and DPO without a second copy of the weights), and in train mode or not
/// (train mode enables LoRA dropout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    pub adapters: bool,
    pub train: bool,
}

impl Mode {
    /// Inference with adapters on.
    pub const EVAL: Mode = Mode {
        adapters: true,
        train: false,
    };
    /// Training with adapters on.
    pub const TRAIN: Mode = Mode {
        adapters: true,
        train: true,
    };
    /// The frozen base model (adapters off).
    pub const REFERENCE: Mode = Mode {
        adapters: false,
        train: false,
    };
}
