//! Where layer parameters come from: a [`WeightSource`] (implemented by the `models` room for
//! safetensors and GGUF) seen through a path builder [`Vb`] whose prefix mirrors the checkpoint
//! key tree (`vb.pp("model").pp("layers").pp(3)`), plus the LoRA decision for each linear slot.

use std::cell::RefCell;
use std::rc::Rc;

use candle_core::{DType, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::linear::LoraConfig;

/// A store of named tensors. `get` returns the tensor under `name` with exactly `shape`, in
/// the source's dtype and device. Implementations may record a missing key or a shape
/// mismatch and return a placeholder, so that a loader can report every problem at once.
pub trait WeightSource {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    fn contains(&self, name: &str) -> bool;
    fn dtype(&self) -> DType;
    fn device(&self) -> &Device;
}

/// Path builder over a [`WeightSource`]: the prefix follows the checkpoint key tree.
#[derive(Clone)]
pub struct Vb<'a> {
    src: &'a dyn WeightSource,
    prefix: String,
    pub(crate) lora: Option<Rc<LoraInit>>,
}

/// The LoRA config plus the seeded generator used to initialise every `A` matrix, shared by
/// all slots so initialisation is reproducible from one seed.
pub struct LoraInit {
    pub config: LoraConfig,
    pub rng: RefCell<StdRng>,
}

impl<'a> Vb<'a> {
    pub fn new(src: &'a dyn WeightSource) -> Self {
        Vb {
            src,
            prefix: String::new(),
            lora: None,
        }
    }

    /// Attach LoRA adapters to every linear slot matched by `config.target_modules`.
    pub fn with_lora(mut self, config: LoraConfig, seed: u64) -> Self {
        self.lora = Some(Rc::new(LoraInit {
            config,
            rng: RefCell::new(StdRng::seed_from_u64(seed)),
        }));
        self
    }

    /// Push one path component.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Vb {
            src: self.src,
            prefix,
            lora: self.lora.clone(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.src.get(&self.key(name), shape)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.src.contains(&self.key(name))
    }

    pub fn dtype(&self) -> DType {
        self.src.dtype()
    }

    pub fn device(&self) -> &Device {
        self.src.device()
    }
}
