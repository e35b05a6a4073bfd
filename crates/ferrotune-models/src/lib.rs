//! Model families and weight loading: Hugging Face `config.json` + safetensors (single or
//! sharded, memory-mapped) and GGUF files, into models that return full `(B, T, V)` logits
//! with LoRA slots and an external KV cache.
//!
//! Owns: configs, family files (`decoder` for Llama/Mistral/Qwen2/Qwen3, `gpt2`), key/shape
//! checks, the reward model's score head (`reward`). Does not own: tokenization, sampling, losses or printing.

pub mod adapter;
pub mod batch;
pub mod config;
pub mod decoder;
pub mod error;
pub mod gguf;
pub mod gpt2;
pub mod init;
pub mod reward;
pub mod source;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result as CResult, Tensor};
use ferrotune_nn::{KvCache, Linear, LoraConfig, Mode, Vb};

pub use batch::Batch;
pub use config::{Activation, Family, HfConfig, LayerType, ModelConfig};
pub use error::{ModelError, Result};
pub use reward::RewardModel;
use source::{CheckedSource, SafetensorsStore};

/// A causal language model: ids in, full logits out.
pub trait CausalLm: Send + Sync {
    fn config(&self) -> &ModelConfig;

    /// Final-normed hidden states (B, T, H). With a cache, the batch holds only new tokens and
    /// `key_mask` covers cached + new positions.
    fn hidden(&self, batch: &Batch, cache: Option<&mut KvCache>, mode: Mode) -> CResult<Tensor>;

    /// The output head, (V, H) weight.
    fn lm_head(&self) -> &Linear;

    /// Every linear slot (adapters are found here), in checkpoint order.
    fn linear_slots(&self) -> Vec<&Linear>;

    /// Logits (B, T, V) in the model's dtype.
    fn forward(&self, batch: &Batch, cache: Option<&mut KvCache>, mode: Mode) -> CResult<Tensor> {
        let h = self.hidden(batch, cache, mode)?;
        self.lm_head().forward(&h, mode)
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.config().num_layers)
    }
}

impl CausalLm for decoder::Decoder {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn hidden(&self, batch: &Batch, cache: Option<&mut KvCache>, mode: Mode) -> CResult<Tensor> {
        decoder::Decoder::hidden(self, batch, cache, mode)
    }
    fn lm_head(&self) -> &Linear {
        &self.lm_head
    }
    fn linear_slots(&self) -> Vec<&Linear> {
        let mut v = Vec::new();
        for l in &self.layers {
            let a = &l.self_attn;
            v.extend([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]);
            v.extend([&l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj]);
        }
        v.push(&self.lm_head);
        v
    }
}

impl CausalLm for gpt2::Gpt2 {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn hidden(&self, batch: &Batch, cache: Option<&mut KvCache>, mode: Mode) -> CResult<Tensor> {
        gpt2::Gpt2::hidden(self, batch, cache, mode)
    }
    fn lm_head(&self) -> &Linear {
        &self.lm_head
    }
    fn linear_slots(&self) -> Vec<&Linear> {
        let mut v = Vec::new();
        for b in &self.h {
            v.extend([&b.c_attn, &b.c_proj, &b.mlp.c_fc, &b.mlp.c_proj]);
        }
        v.push(&self.lm_head);
        v
    }
}

/// How to load: dtype, device, and optional fresh LoRA adapters (seeded).
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    pub lora: Option<(LoraConfig, u64)>,
    /// Full fine-tuning: every base weight becomes a trainable `Var` (see `Loaded::base_params`).
    pub trainable_base: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            lora: None,
            trainable_base: false,
        }
    }
}

/// A loaded model and where it came from.
pub struct Loaded {
    pub model: Box<dyn CausalLm>,
    /// The model folder, or the GGUF file.
    pub path: PathBuf,
    /// With `trainable_base`: every base weight as a trainable `Var`, by checkpoint name.
    pub base_params: Vec<(String, candle_core::Var)>,
}

fn is_pickle(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("bin" | "pt" | "pth" | "pkl" | "ckpt")
    )
}

/// The safetensors files of a model folder (single file or the shards of an index).
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
            path: index.clone(),
            source,
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: index.clone(),
                source,
            })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Config {
                path: index.clone(),
                field: "weight_map".into(),
                msg: "missing or not an object".into(),
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    for name in [
        "pytorch_model.bin",
        "model.pt",
        "pytorch_model.bin.index.json",
    ] {
        let p = dir.join(name);
        if p.exists() {
            return Err(ModelError::Pickle {
                path: p,
                what: "PyTorch checkpoint".into(),
            });
        }
    }
    Err(ModelError::NotAModel {
        path: dir.to_path_buf(),
    })
}

/// Build the family's model over a checked source, then report every weight problem at once.
pub fn build(
    cfg: &ModelConfig,
    src: &CheckedSource,
    opts: &LoadOptions,
) -> Result<Box<dyn CausalLm>> {
    let mut vb = Vb::new(src);
    if let Some((lora, seed)) = &opts.lora {
        vb = vb.with_lora(lora.clone(), *seed);
    }
    let model: Box<dyn CausalLm> = match cfg.family {
        Family::Gpt2 => Box::new(gpt2::Gpt2::load(&vb, cfg)?),
        _ => Box::new(decoder::Decoder::load(&vb, cfg)?),
    };
    src.finish()?;
    Ok(model)
}

/// Load a model from a Hugging Face folder or a `.gguf` file.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    if !path.exists() {
        return Err(ModelError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        });
    }
    if path.is_file() {
        if is_pickle(path) {
            return Err(ModelError::Pickle {
                path: path.to_path_buf(),
                what: "PyTorch checkpoint".into(),
            });
        }
        if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
            let (cfg, mut src) = gguf::open(path, opts)?;
            if opts.trainable_base {
                src = src.make_trainable();
            }
            let model = build(&cfg, &src, opts)?;
            return Ok(Loaded {
                model,
                path: path.to_path_buf(),
                base_params: src.trainable_params(),
            });
        }
        return Err(ModelError::NotAModel {
            path: path.to_path_buf(),
        });
    }
    let cfg = ModelConfig::from_file(&path.join("config.json"))?;
    let files = safetensors_files(path)?;
    let store = SafetensorsStore::open(&files, path)?;
    let mut src = CheckedSource::new(Box::new(store), opts.dtype, opts.device.clone());
    if opts.trainable_base {
        src = src.make_trainable();
    }
    let model = build(&cfg, &src, opts)?;
    Ok(Loaded {
        model,
        path: path.to_path_buf(),
        base_params: src.trainable_params(),
    })
}
