//! GGUF files (llama.cpp's format): metadata resolved into a [`ModelConfig`], and a
//! [`GgufStore`] that serves every tensor under its Hugging Face name, dequantized to f32 (the
//! checking layer then casts it to the model dtype), in the layout transformers uses: the q/k
//! row permutation of llama.cpp's Llama converter undone, GPT-2's Conv1D `(in, out)` restored.
//!
//! Owns: GGUF -> HF tensor names, metadata -> config, truncation checks at open time.
//! Does not own: keeping tensors quantized as a frozen base, or the tokenizer and chat template
//! stored in the metadata (the `tokenize` room reads those; [`GgufStore::metadata`] exposes them).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::config::{Family, HfConfig};
use crate::error::{ModelError, Result};
use crate::source::{root_msg, CheckedSource, RawStore};
use crate::{LoadOptions, ModelConfig};

/// Open a GGUF file: its resolved config and a checked weight source with HF tensor names.
pub fn open(path: &Path, opts: &LoadOptions) -> Result<(ModelConfig, CheckedSource)> {
    let store = GgufStore::open(path)?;
    let cfg = store.config()?;
    let src = CheckedSource::new(Box::new(store), opts.dtype, opts.device.clone());
    Ok((cfg, src))
}

/// How a GGUF tensor becomes the HF tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fix {
    None,
    /// llama.cpp interleaves each head's two rotary halves (for its "NORM" rope); HF's
    /// `rotate_half` wants them back as contiguous halves. `n_head` = heads of this projection.
    Unpermute {
        n_head: usize,
    },
    /// GPT-2 Conv1D weights: llama.cpp stores them `(out, in)`, transformers keeps `(in, out)`.
    Transpose,
    /// Gemma's RMSNorm weights: llama.cpp stores the scale `1 + w`, transformers keeps `w`.
    MinusOne,
}

#[derive(Debug, Clone)]
struct Mapped {
    gguf: String,
    fix: Fix,
}

/// The tensors of one GGUF file under Hugging Face names.
pub struct GgufStore {
    origin: PathBuf,
    /// Tensors are read one at a time (seek + read), so the handle sits behind a lock.
    file: Mutex<File>,
    content: Content,
    family: Family,
    /// `general.architecture`, the prefix of the model's metadata keys.
    arch: String,
    /// HF name -> GGUF tensor and fix.
    map: BTreeMap<String, Mapped>,
    /// GGUF tensors with no HF counterpart, listed under their own names so that the
    /// unused-key check reports them.
    unmapped: Vec<String>,
}

/// GGUF tensors that the config consumes instead of the model.
const CONSUMED_BY_CONFIG: &[&str] = &["rope_freqs.weight"];

impl GgufStore {
    /// Read the header, check that every tensor lies inside the file, and map the names.
    pub fn open(path: &Path) -> Result<Self> {
        let gguf_err = |msg: String| ModelError::Gguf {
            path: path.to_path_buf(),
            msg,
        };
        let mut file = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file_len = file
            .metadata()
            .map_err(|source| ModelError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if file_len == 0 {
            return Err(gguf_err("the file is empty".into()));
        }
        let content = Content::read(&mut file).map_err(|e| gguf_err(header_msg(&e, path)))?;
        // A file cut inside the tensor data still has a readable header; catch it here rather
        // than as one "cannot read" problem per tensor at load time.
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if elems % block != 0 {
                return Err(gguf_err(format!(
                    "tensor `{name}` has {elems} elements, not a multiple of the {:?} block size {block}",
                    info.ggml_dtype
                )));
            }
            let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(bytes);
            if end > file_len {
                return Err(gguf_err(format!(
                    "tensor `{name}` ({:?}, shape {:?}) ends at byte {end} but the file has only \
                     {file_len} bytes; the file is truncated (incomplete download?)",
                    info.ggml_dtype,
                    info.shape.dims()
                )));
            }
        }
        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(meta_err(path, "general.architecture", "not a string")),
            None => return Err(meta_err(path, "general.architecture", "missing")),
        };
        let family = match arch.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma3" => Family::Gemma3,
            "gpt2" => Family::Gpt2,
            _ => {
                return Err(ModelError::UnknownModelType {
                    path: path.to_path_buf(),
                    model_type: arch,
                })
            }
        };
        let mut store = GgufStore {
            origin: path.to_path_buf(),
            file: Mutex::new(file),
            content,
            family,
            arch,
            map: BTreeMap::new(),
            unmapped: Vec::new(),
        };
        store.map_names()?;
        Ok(store)
    }

    /// The file's metadata (tokenizer, chat template, ...), as candle reads it.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn family(&self) -> Family {
        self.family
    }

    fn meta(&self) -> Meta<'_> {
        Meta {
            path: &self.origin,
            md: &self.content.metadata,
            arch: &self.arch,
        }
    }

    fn has(&self, gguf_name: &str) -> bool {
        self.content.tensor_infos.contains_key(gguf_name)
    }

    fn map_names(&mut self) -> Result<()> {
        // llama.cpp applies the q/k permutation only for the architectures it runs with
        // interleaved ("NORM") rope: the Llama converter and its Mistral subclass.
        let heads = match self.family {
            Family::Llama | Family::Mistral => {
                let m = self.meta();
                let h = m.req_usize("attention.head_count")?;
                let kv = m.usize("attention.head_count_kv")?.unwrap_or(h);
                Some((h, kv))
            }
            _ => None,
        };
        let gpt2 = self.family == Family::Gpt2;
        let gemma = self.family == Family::Gemma3;
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for g in names {
            if CONSUMED_BY_CONFIG.contains(&g.as_str()) {
                continue;
            }
            let Some((hf, part)) = hf_name(self.family, g) else {
                self.unmapped.push(g.clone());
                continue;
            };
            let fix = match (heads, part.as_str()) {
                (Some((h, _)), "attn_q") => Fix::Unpermute { n_head: h },
                (Some((_, kv)), "attn_k") => Fix::Unpermute { n_head: kv },
                _ if gpt2
                    && g.ends_with(".weight")
                    && matches!(
                        part.as_str(),
                        "attn_qkv" | "attn_output" | "ffn_up" | "ffn_down"
                    ) =>
                {
                    Fix::Transpose
                }
                _ if gemma && part.ends_with("norm") && g.ends_with(".weight") => Fix::MinusOne,
                _ => Fix::None,
            };
            self.map.insert(
                hf,
                Mapped {
                    gguf: g.clone(),
                    fix,
                },
            );
        }
        Ok(())
    }

    /// Resolve the metadata into a [`ModelConfig`] (through [`HfConfig`], so the cross-field
    /// checks of `config.json` apply here too).
    pub fn config(&self) -> Result<ModelConfig> {
        let m = self.meta();
        let md = &self.content.metadata;
        let vocab = match md.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => Some(a.len()),
            _ => None,
        }
        .or(m.usize("vocab_size")?)
        .or_else(|| {
            self.content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
        });
        let token_id = |key: &str| -> Result<Option<serde_json::Value>> {
            Ok(m.int_at(key)?.map(serde_json::Value::from))
        };
        let mut hf = HfConfig {
            model_type: Some(self.family.model_type().to_string()),
            vocab_size: vocab,
            tie_word_embeddings: Some(!self.has("output.weight")),
            max_position_embeddings: m.usize("context_length")?,
            bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: token_id("tokenizer.ggml.eos_token_id")?,
            ..HfConfig::default()
        };
        let block_count = m.req_usize("block_count")?;
        let hidden = m.req_usize("embedding_length")?;
        let ffn = m.req_usize("feed_forward_length")?;
        let heads = m.req_usize("attention.head_count")?;
        if self.family == Family::Gpt2 {
            hf.n_embd = Some(hidden);
            hf.n_layer = Some(block_count);
            hf.n_head = Some(heads);
            hf.n_inner = Some(ffn);
            hf.n_positions = hf.max_position_embeddings.take();
            hf.layer_norm_epsilon = m.f64("attention.layer_norm_epsilon")?;
            return ModelConfig::from_hf(&hf, &self.origin);
        }
        hf.hidden_size = Some(hidden);
        hf.intermediate_size = Some(ffn);
        hf.num_hidden_layers = Some(block_count);
        hf.num_attention_heads = Some(heads);
        hf.num_key_value_heads = m.usize("attention.head_count_kv")?;
        hf.rms_norm_eps = m.f64("attention.layer_norm_rms_epsilon")?;
        hf.rope_theta = m.f64("rope.freq_base")?;
        let rope_dim = m.usize("rope.dimension_count")?;
        // Qwen3 (and any model whose heads are not hidden / heads wide) states the head width
        // as `key_length`; llama.cpp's Llama converter states it as the rotary dimension.
        hf.head_dim = m.usize("attention.key_length")?.or(match self.family {
            Family::Llama | Family::Mistral => rope_dim,
            _ => None,
        });
        if self.family == Family::Gemma3 {
            // As transformers reads a Gemma 3 GGUF: the window from the metadata; the layer
            // pattern (every 6th layer global), the local RoPE base (10000) and
            // query_pre_attn_scalar (256) are the config class's defaults, which llama.cpp
            // also assumes rather than stores.
            hf.sliding_window = m.usize("attention.sliding_window")?.map(Into::into);
        }
        hf.attention_bias = Some(self.has("blk.0.attn_q.bias"));
        hf.mlp_bias = Some(self.has("blk.0.ffn_up.bias"));
        hf.rope_scaling = self.rope_scaling(hf.rope_theta.unwrap_or(10000.0), &hf, rope_dim)?;
        let cfg = ModelConfig::from_hf(&hf, &self.origin)?;
        if let Some(r) = rope_dim {
            if r != cfg.head_dim {
                return Err(m.err(
                    "rope.dimension_count",
                    &format!(
                        "partial rotary embeddings ({r} of head_dim {}) are not supported",
                        cfg.head_dim
                    ),
                ));
            }
        }
        Ok(cfg)
    }

    /// Rope scaling as a `config.json` `rope_scaling` object: from the `rope.scaling.*` keys,
    /// or recognised from a Llama 3 `rope_freqs` tensor (llama.cpp stores the per-frequency
    /// divisors instead of the parameters).
    fn rope_scaling(
        &self,
        theta: f64,
        hf: &HfConfig,
        rope_dim: Option<usize>,
    ) -> Result<Option<serde_json::Value>> {
        let m = self.meta();
        let kind = m.str("rope.scaling.type")?;
        let factor = m
            .f64("rope.scaling.factor")?
            .or(m.f64("rope.scale_linear")?);
        let obj = |kind: &str| {
            let mut o = serde_json::json!({ "rope_type": kind });
            if let Some(f) = factor {
                o["factor"] = f.into();
            }
            o
        };
        match kind.as_deref() {
            Some("none") => return Ok(None),
            Some(k) => return Ok(Some(obj(k))),
            None if factor.is_some() => return Ok(Some(obj("linear"))),
            None => {}
        }
        if !self.has("rope_freqs.weight") {
            return Ok(None);
        }
        let head_dim = match (hf.head_dim, hf.hidden_size, hf.num_attention_heads) {
            (Some(d), _, _) => d,
            (None, Some(h), Some(n)) if n > 0 => h / n,
            _ => rope_dim.unwrap_or(0),
        };
        let fail = |msg: String| ModelError::Config {
            path: self.origin.clone(),
            field: "rope_freqs.weight".into(),
            msg,
        };
        let t = self
            .read("rope_freqs.weight", Fix::None)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| fail(root_msg(&e)))?;
        if t.len() * 2 != head_dim {
            return Err(fail(format!(
                "has {} entries, expected head_dim / 2 = {}",
                t.len(),
                head_dim / 2
            )));
        }
        let factor = t.iter().fold(1.0f64, |a, &x| a.max(x as f64));
        if t.iter().all(|&x| (x - 1.0).abs() < 1e-6) {
            return Ok(None);
        }
        // Every Llama 3.x release uses these three; only `factor` varies (8 for 3.1, 32 for
        // 3.2). The file holds their result, so check it rather than trust it.
        let (low, high, old_len) = (1.0f64, 4.0f64, 8192.0f64);
        for (i, &got) in t.iter().enumerate() {
            let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let want = if wavelen < old_len / high {
                1.0
            } else if wavelen > old_len / low {
                factor
            } else {
                let smooth = (old_len / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            if (want - got as f64).abs() > 1e-3 * want.abs().max(1.0) {
                return Err(fail(format!(
                    "entry {i} is {got}, but Llama 3 scaling (factor {factor}, low_freq_factor 1, \
                     high_freq_factor 4, original context 8192) gives {want}; other per-frequency \
                     rope factors are not supported"
                )));
            }
        }
        Ok(Some(serde_json::json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": old_len,
        })))
    }

    /// Read and dequantize one GGUF tensor (f32, on the CPU), then apply `fix`.
    fn read(&self, gguf_name: &str, fix: Fix) -> candle_core::Result<Tensor> {
        let info = self
            .content
            .tensor_infos
            .get(gguf_name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor `{gguf_name}`")))?;
        let q = {
            let mut f = self
                .file
                .lock()
                .map_err(|_| candle_core::Error::Msg("GGUF file handle poisoned".into()))?;
            info.read(&mut *f, self.content.tensor_data_offset, &Device::Cpu)?
        };
        let t = q.dequantize(&Device::Cpu)?;
        match fix {
            Fix::None => Ok(t),
            Fix::Transpose => t.t()?.contiguous(),
            Fix::Unpermute { n_head } => unpermute_rows(&t, n_head),
            Fix::MinusOne => t.affine(1.0, -1.0),
        }
    }
}

impl RawStore for GgufStore {
    fn names(&self) -> Vec<String> {
        self.map
            .keys()
            .cloned()
            .chain(self.unmapped.iter().cloned())
            .collect()
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Option<Tensor>> {
        match self.map.get(name) {
            Some(m) => self.read(&m.gguf, m.fix)?.to_device(device).map(Some),
            None => Ok(None),
        }
    }

    fn origin(&self) -> &Path {
        &self.origin
    }
}

/// Undo llama.cpp's `permute`: per head, its rows are stored as pairs `(2j, 2j+1)` taken from
/// rows `j` and `j + head_dim/2` of the HF weight (or bias). Weight (n_head * head_dim, in).
pub fn unpermute_rows(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if n_head == 0 || rows % (2 * n_head) != 0 {
        candle_core::bail!("cannot split {rows} q/k rows into {n_head} heads of even width");
    }
    let rest: usize = dims[1..].iter().product();
    let half = rows / n_head / 2;
    t.reshape((n_head, half, 2, rest))? // (heads, head_dim/2, 2, in): the GGUF row order
        .transpose(1, 2)? // (heads, 2, head_dim/2, in): the HF row order
        .contiguous()?
        .reshape(dims)
}

/// The HF name of a GGUF tensor and its GGUF part name (`attn_q`, ...), or None if the family
/// has no such tensor.
fn hf_name(family: Family, g: &str) -> Option<(String, String)> {
    let gpt2 = family == Family::Gpt2;
    let top = match (g, gpt2) {
        ("token_embd.weight", false) => Some("model.embed_tokens.weight"),
        ("output_norm.weight", false) => Some("model.norm.weight"),
        ("token_embd.weight", true) => Some("transformer.wte.weight"),
        ("position_embd.weight", true) => Some("transformer.wpe.weight"),
        ("output_norm.weight", true) => Some("transformer.ln_f.weight"),
        ("output_norm.bias", true) => Some("transformer.ln_f.bias"),
        ("output.weight", _) => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some((t.to_string(), g.split('.').next().unwrap_or(g).to_string()));
    }
    let rest = g.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let module = if gpt2 {
        match part {
            "attn_norm" => "ln_1",
            "attn_qkv" => "attn.c_attn",
            "attn_output" => "attn.c_proj",
            "ffn_norm" => "ln_2",
            "ffn_up" => "mlp.c_fc",
            "ffn_down" => "mlp.c_proj",
            _ => return None,
        }
    } else {
        let gemma = family == Family::Gemma3;
        match part {
            "attn_norm" => "input_layernorm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "attn_q_norm" => "self_attn.q_norm",
            "attn_k_norm" => "self_attn.k_norm",
            // Gemma's norm of the attention output, then its two norms around the MLP (llama.cpp
            // names the pre-MLP norm `ffn_norm` in both layouts).
            "post_attention_norm" if gemma => "post_attention_layernorm",
            "ffn_norm" if gemma => "pre_feedforward_layernorm",
            "post_ffw_norm" if gemma => "post_feedforward_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            _ => return None,
        }
    };
    let root = if gpt2 {
        "transformer.h"
    } else {
        "model.layers"
    };
    Some((
        format!("{root}.{layer}.{module}.{suffix}"),
        part.to_string(),
    ))
}

/// GGML's names of its tensor types (ggml.h `enum ggml_type`), for the error on a type that
/// candle does not read.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        4 | 5 => "Q4_2/Q4_3 (removed from ggml)",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// A readable message for a header that candle could not parse.
fn header_msg(e: &candle_core::Error, path: &Path) -> String {
    let msg = root_msg(e);
    let unknown_type = msg
        .strip_prefix("unknown dtype for tensor ")
        .and_then(|n| n.trim().parse::<u32>().ok());
    if let Some(id) = unknown_type {
        // candle's error has the type, not the tensor: find the first tensor stored in it.
        let which = first_tensor_of_type(path, id)
            .map(|name| format!("tensor `{name}`"))
            .unwrap_or_else(|| "a tensor".into());
        return format!(
            "{which} is stored as GGML type {id} ({}), which ferrotune cannot read; supported: \
             F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, \
             Q8_K (re-quantize the file, e.g. with llama.cpp's llama-quantize)",
            ggml_type_name(id)
        );
    }
    if msg.contains("unknown magic") {
        format!("not a GGUF file (the first four bytes are not `GGUF`): {msg}")
    } else if msg.contains("failed to fill whole buffer") || msg.contains("remaining") {
        format!("the header ends early; the file is truncated: {msg}")
    } else {
        msg
    }
}

/// The name of the first tensor whose GGML type is `ty`, from a light walk of the GGUF header
/// (magic, version, counts, metadata values skipped, tensor infos). `None` when the header cannot
/// be walked; used only to name the tensor in an error.
fn first_tensor_of_type(path: &Path, ty: u32) -> Option<String> {
    use std::io::{BufReader, Read};
    struct R(BufReader<File>);
    impl R {
        fn u32(&mut self) -> Option<u32> {
            let mut b = [0u8; 4];
            self.0.read_exact(&mut b).ok()?;
            Some(u32::from_le_bytes(b))
        }
        fn u64(&mut self) -> Option<u64> {
            let mut b = [0u8; 8];
            self.0.read_exact(&mut b).ok()?;
            Some(u64::from_le_bytes(b))
        }
        fn skip(&mut self, n: u64) -> Option<()> {
            self.0.seek_relative(i64::try_from(n).ok()?).ok()
        }
        fn string(&mut self) -> Option<String> {
            let n = self.u64()?;
            if n > 1 << 16 {
                return None; // no tensor name is this long: not a header we can walk
            }
            let mut b = vec![0u8; n as usize];
            self.0.read_exact(&mut b).ok()?;
            Some(String::from_utf8_lossy(&b).into_owned())
        }
        /// Skip one metadata value of GGUF value type `t`.
        fn skip_value(&mut self, t: u32, depth: u32) -> Option<()> {
            match t {
                0 | 1 | 7 => self.skip(1),
                2 | 3 => self.skip(2),
                4..=6 => self.skip(4),
                10..=12 => self.skip(8),
                8 => {
                    let n = self.u64()?;
                    self.skip(n)
                }
                9 if depth < 4 => {
                    let (et, n) = (self.u32()?, self.u64()?);
                    match et {
                        8 | 9 => (0..n).try_for_each(|_| self.skip_value(et, depth + 1)),
                        _ => {
                            let width = match et {
                                0 | 1 | 7 => 1,
                                2 | 3 => 2,
                                4..=6 => 4,
                                10..=12 => 8,
                                _ => return None,
                            };
                            self.skip(n.checked_mul(width)?)
                        }
                    }
                }
                _ => None,
            }
        }
    }
    let mut r = R(BufReader::new(File::open(path).ok()?));
    let (_magic, version) = (r.u32()?, r.u32()?);
    if version < 2 {
        return None;
    }
    let (n_tensors, n_kv) = (r.u64()?, r.u64()?);
    for _ in 0..n_kv {
        let _key = r.string()?;
        let t = r.u32()?;
        r.skip_value(t, 0)?;
    }
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()?;
        r.skip(8 * u64::from(n_dims))?;
        if r.u32()? == ty {
            return Some(name);
        }
        r.skip(8)?; // offset
    }
    None
}

fn meta_err(path: &Path, key: &str, msg: &str) -> ModelError {
    ModelError::Config {
        path: path.to_path_buf(),
        field: key.to_string(),
        msg: msg.to_string(),
    }
}

/// Typed access to `{arch}.*` metadata keys, with errors that name the full key.
struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
    arch: &'a str,
}

impl Meta<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    fn err(&self, k: &str, msg: &str) -> ModelError {
        meta_err(self.path, &self.key(k), msg)
    }

    /// `{arch}.k` as a non-negative integer.
    fn usize(&self, k: &str) -> Result<Option<usize>> {
        self.int_at(&self.key(k))
    }

    /// A key given in full (e.g. `tokenizer.ggml.bos_token_id`) as a non-negative integer.
    fn int_at(&self, key: &str) -> Result<Option<usize>> {
        let v = match self.md.get(key) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n: Option<i128> = match v {
            Value::U8(x) => Some(*x as i128),
            Value::I8(x) => Some(*x as i128),
            Value::U16(x) => Some(*x as i128),
            Value::I16(x) => Some(*x as i128),
            Value::U32(x) => Some(*x as i128),
            Value::I32(x) => Some(*x as i128),
            Value::U64(x) => Some(*x as i128),
            Value::I64(x) => Some(*x as i128),
            _ => None,
        };
        match n {
            Some(n) if n >= 0 && n <= usize::MAX as i128 => Ok(Some(n as usize)),
            Some(n) => Err(meta_err(self.path, key, &format!("{n} is out of range"))),
            None if matches!(v, Value::Array(_)) => Err(meta_err(
                self.path,
                key,
                "per-layer arrays are not supported (expected one integer)",
            )),
            None => Err(meta_err(
                self.path,
                key,
                &format!("expected an integer, got {v:?}"),
            )),
        }
    }

    fn req_usize(&self, k: &str) -> Result<usize> {
        match self.usize(k)? {
            Some(0) => Err(self.err(k, "must be > 0")),
            Some(x) => Ok(x),
            None => Err(self.err(k, "missing")),
        }
    }

    fn f64(&self, k: &str) -> Result<Option<f64>> {
        let key = self.key(k);
        match self.md.get(&key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(_) => self.int_at(&key).map(|n| n.map(|n| n as f64)),
        }
    }

    fn str(&self, k: &str) -> Result<Option<String>> {
        match self.md.get(&self.key(k)) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(k, &format!("expected a string, got {v:?}"))),
        }
    }
}
