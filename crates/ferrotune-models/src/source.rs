//! Weight sources: raw stores (safetensors files, GGUF) behind a checking layer that converts
//! every tensor to the model's dtype/device and records each missing key, shape mismatch and
//! unused key, so a loader reports all problems by name in one error instead of the first.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor, Var};
use ferrotune_nn::WeightSource;

use crate::error::{ModelError, Result};

/// A store of named tensors in some file format.
pub trait RawStore {
    /// Every tensor name in the store.
    fn names(&self) -> Vec<String>;
    /// The tensor under `name` (any dtype), or None when absent.
    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Option<Tensor>>;
    /// The file or folder the store reads, for error messages.
    fn origin(&self) -> &Path;
}

/// One or several (sharded) safetensors files, memory-mapped.
pub struct SafetensorsStore {
    origin: PathBuf,
    files: Vec<MmapedSafetensors>,
    /// name -> index into `files`
    routing: BTreeMap<String, usize>,
}

impl SafetensorsStore {
    /// Open `model.safetensors` or the shards listed by `model.safetensors.index.json`.
    pub fn open(paths: &[PathBuf], origin: &Path) -> Result<Self> {
        let mut files = Vec::new();
        let mut routing = BTreeMap::new();
        for (i, p) in paths.iter().enumerate() {
            if !p.exists() {
                return Err(ModelError::Io {
                    path: p.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
                });
            }
            // SAFETY: the file is mapped read-only; like every mmap-based loader we assume it
            // is not modified while the model is alive.
            let st = unsafe { MmapedSafetensors::new(p) }.map_err(|e| ModelError::Safetensors {
                path: p.clone(),
                msg: root_msg(&e),
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, i);
            }
            files.push(st);
        }
        Ok(SafetensorsStore {
            origin: origin.to_path_buf(),
            files,
            routing,
        })
    }
}

/// The innermost message of a candle error (without candle's backtrace noise).
pub(crate) fn root_msg(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithPath { inner, .. } => root_msg(inner),
        candle_core::Error::Context { inner, .. } => root_msg(inner),
        candle_core::Error::WithBacktrace { inner, .. } => root_msg(inner),
        other => other.to_string(),
    }
}

impl RawStore for SafetensorsStore {
    fn names(&self) -> Vec<String> {
        self.routing.keys().cloned().collect()
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Option<Tensor>> {
        match self.routing.get(name) {
            Some(&i) => self.files[i].load(name, device).map(Some),
            None => Ok(None),
        }
    }

    fn origin(&self) -> &Path {
        &self.origin
    }
}

/// Names that checkpoints may carry but that we derive instead of loading.
fn ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
}

/// Checking adapter from a [`RawStore`] to the layers' [`WeightSource`].
pub struct CheckedSource {
    store: Box<dyn RawStore>,
    dtype: DType,
    device: Device,
    used: RefCell<BTreeSet<String>>,
    problems: RefCell<Vec<String>>,
    /// Full fine-tuning: every weight is handed out as a trainable `Var` and recorded here.
    trainable: Option<RefCell<Vec<(String, Var)>>>,
}

impl CheckedSource {
    pub fn new(store: Box<dyn RawStore>, dtype: DType, device: Device) -> Self {
        CheckedSource {
            store,
            dtype,
            device,
            used: RefCell::new(BTreeSet::new()),
            problems: RefCell::new(Vec::new()),
            trainable: None,
        }
    }

    /// Hand out every weight as a trainable `Var` (full fine-tuning).
    pub fn make_trainable(mut self) -> Self {
        self.trainable = Some(RefCell::new(Vec::new()));
        self
    }

    /// The trainable weights handed out so far, by checkpoint name.
    pub fn trainable_params(&self) -> Vec<(String, Var)> {
        self.trainable
            .as_ref()
            .map(|v| v.borrow().clone())
            .unwrap_or_default()
    }

    /// Mark a key as consumed without loading it through `get` (e.g. a tied head).
    pub fn mark_used(&self, name: &str) {
        self.used.borrow_mut().insert(name.to_string());
    }

    /// After the model is built: an error listing every missing key, shape mismatch and unused
    /// key, or Ok.
    pub fn finish(&self) -> Result<()> {
        let mut problems = self.problems.borrow().clone();
        let used = self.used.borrow();
        let unexpected: Vec<String> = self
            .store
            .names()
            .into_iter()
            .filter(|n| !used.contains(n) && !ignorable(n))
            .collect();
        if !unexpected.is_empty() {
            problems.push(format!("unexpected keys: {}", abbreviate(&unexpected)));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Weights {
                path: self.store.origin().to_path_buf(),
                problems,
            })
        }
    }
}

fn abbreviate(names: &[String]) -> String {
    const MAX: usize = 12;
    let mut s = names
        .iter()
        .take(MAX)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > MAX {
        s.push_str(&format!(" (and {} more)", names.len() - MAX));
    }
    s
}

impl WeightSource for CheckedSource {
    fn get(&self, name: &str, shape: &[usize]) -> candle_core::Result<Tensor> {
        self.used.borrow_mut().insert(name.to_string());
        let placeholder = || Tensor::zeros(shape, self.dtype, &self.device);
        match self.store.load(name, &self.device) {
            Ok(Some(t)) if t.dims() == shape => {
                let t = t.to_dtype(self.dtype)?;
                match &self.trainable {
                    Some(vars) => {
                        let v = Var::from_tensor(&t)?;
                        vars.borrow_mut().push((name.to_string(), v.clone()));
                        Ok(v.as_tensor().clone())
                    }
                    None => Ok(t),
                }
            }
            Ok(Some(t)) => {
                self.problems.borrow_mut().push(format!(
                    "shape mismatch for {name}: file has {:?}, model expects {:?}",
                    t.dims(),
                    shape
                ));
                placeholder()
            }
            Ok(None) => {
                self.problems
                    .borrow_mut()
                    .push(format!("missing key {name} (shape {shape:?})"));
                placeholder()
            }
            Err(e) => {
                self.problems
                    .borrow_mut()
                    .push(format!("cannot read {name}: {}", root_msg(&e)));
                placeholder()
            }
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.store.names().iter().any(|n| n == name)
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }
}
