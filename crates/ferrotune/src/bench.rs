//! `ferrotune bench`: the timed phases bench/gpu/run.sh compares with PyTorch, transformers +
//! peft and transformers `generate`, on a randomly initialised Qwen2-shaped model (no download).
//!
//! Owns: building the benchmark model, timing a LoRA training step and a rollout, and printing
//! one JSON line per run. Does not own: the comparison or the table (bench/gpu/).
//!
//! The LoRA step is what SFT and GRPO run: forward with adapters on all seven projections,
//! mean next-token NLL over the vocabulary (our chunked log-prob op), backward, AdamW on the
//! adapters. Timings synchronise the device after each step; the median of `steps` steps after
//! `warmup` is reported.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use ferrotune_generate::{generate, GenerateOptions, SamplingParams};
use ferrotune_models::config::{Activation, Family, LayerType, ModelConfig};
use ferrotune_models::init::{init_model, InitOptions};
use ferrotune_models::{Batch, CausalLm, LoadOptions};
use ferrotune_nn::{gpu, ops, LoraConfig, Mode, RopeScaling, TargetModules};
use ferrotune_train::optim::{AdamW, AdamWConfig};

/// The benchmark model's shape: Qwen2.5-0.5B's (hidden 896, 14 / 2 heads of 64, MLP 4864),
/// with a chosen depth and vocabulary.
#[derive(Debug, Clone, clap::Args)]
pub struct ShapeArgs {
    #[arg(long, default_value_t = 24)]
    pub layers: usize,
    #[arg(long, default_value_t = 151_936)]
    pub vocab: usize,
    #[arg(long, default_value_t = 896)]
    pub hidden: usize,
    #[arg(long, default_value_t = 4864)]
    pub intermediate: usize,
    #[arg(long, default_value_t = 14)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    #[arg(long, default_value = "cuda")]
    pub device: String,
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl ShapeArgs {
    fn config(&self) -> ModelConfig {
        ModelConfig {
            family: Family::Qwen2,
            vocab_size: self.vocab,
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.hidden / self.heads.max(1),
            norm_eps: 1e-6,
            rope_theta: 1e6,
            rope_scaling: RopeScaling::None,
            tie_word_embeddings: true,
            max_position_embeddings: 32_768,
            attention_bias: true,
            mlp_bias: false,
            sliding_window: None,
            layer_types: vec![LayerType::Full; self.layers],
            hidden_act: Activation::Silu,
            rope_local_theta: None,
            query_pre_attn_scalar: None,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }
}

fn lora_all() -> LoraConfig {
    let names = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.0,
        use_rslora: false,
        target_modules: TargetModules::Names(names.iter().map(|s| s.to_string()).collect()),
    }
}

/// Deterministic pseudo-random ids in [100, min(V, 20000)) (the formula torch_step.py uses).
fn ids(b: usize, t: usize, vocab: usize) -> Vec<Vec<u32>> {
    let span = vocab.min(20_000).saturating_sub(100).max(1);
    (0..b)
        .map(|i| {
            (0..t)
                .map(|j| (100 + (i * 7919 + j * 104_729) % span) as u32)
                .collect()
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn setup(shape: &ShapeArgs, lora: bool) -> Result<(Box<dyn CausalLm>, Device)> {
    let device = crate::lm::parse_device(&shape.device)?;
    let dtype = crate::lm::parse_dtype(&shape.dtype)?;
    gpu::keep_freed_memory(&device);
    let opts = LoadOptions {
        dtype,
        device: device.clone(),
        lora: lora.then(|| (lora_all(), shape.seed)),
        trainable_base: false,
    };
    let init = InitOptions {
        initializer_range: 0.02,
        seed: shape.seed,
        pad_token_id: None,
    };
    let loaded = init_model(&shape.config(), &init, &opts).context("building the bench model")?;
    Ok((loaded.model, device))
}

fn gb(bytes: Option<u64>) -> serde_json::Value {
    bytes.map_or(serde_json::Value::Null, |b| {
        serde_json::json!((b as f64 / 1e9 * 1000.0).round() / 1000.0)
    })
}

/// Times the LoRA training step; returns the JSON line.
pub fn lora_step(
    shape: &ShapeArgs,
    batch: usize,
    seq: usize,
    steps: usize,
    warmup: usize,
) -> Result<serde_json::Value> {
    let (model, device) = setup(shape, true)?;
    let vars = ferrotune_train::trainer::Trainable::lora_params(model.as_ref());
    let n_lora: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AdamW::new(vars, AdamWConfig::default())?;
    let seqs = ids(batch, seq, shape.vocab);
    let b = Batch::right_padded(&seqs, 0, &device)?;
    // Next-token targets of every position but the last: rows (i, j) -> token (i, j + 1).
    let targets: Vec<u32> = seqs.iter().flat_map(|r| r[1..].to_vec()).collect();
    let rows: Vec<u32> = (0..batch)
        .flat_map(|i| (0..seq - 1).map(move |j| (i * seq + j) as u32))
        .collect();
    let targets = Tensor::new(targets, &device)?;
    let rows = Tensor::new(rows, &device)?;
    // Whole-step times, and per phase (each phase ends with a device synchronisation).
    let (mut times, mut fwd, mut bwd, mut upd) = (vec![], vec![], vec![], vec![]);
    let mut last_loss = f32::NAN;
    gpu::reset_peak(&device);
    for i in 0..warmup + steps {
        device.synchronize()?;
        let t0 = Instant::now();
        let h = model.hidden(&b, None, Mode::TRAIN)?; // (B, T, H)
        let (bb, tt, hh) = h.dims3()?;
        let h = h.reshape((bb * tt, hh))?.index_select(&rows, 0)?;
        let lp = ops::token_logprobs(&h, &model.lm_head().weight, &targets, 1.0)?;
        let loss = lp.mean_all()?.neg()?;
        device.synchronize()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        device.synchronize()?;
        let t2 = Instant::now();
        opt.step(&grads, 1e-4)?;
        device.synchronize()?;
        let t3 = Instant::now();
        if i >= warmup {
            times.push((t3 - t0).as_secs_f64());
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            upd.push((t3 - t2).as_secs_f64());
        }
        last_loss = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    }
    let ms = |v: Vec<f64>| (median(v) * 1e4).round() / 10.0;
    let phases = serde_json::json!({"forward": ms(fwd), "backward": ms(bwd), "optimizer": ms(upd)});
    let med = median(times);
    Ok(serde_json::json!({
        "who": "ferrotune",
        "bench": "lora_step",
        "layers": shape.layers,
        "vocab": shape.vocab,
        "batch": batch,
        "seq": seq,
        "dtype": shape.dtype,
        "ms_per_step": (med * 1e4).round() / 10.0,
        "tokens_per_s": (batch * seq) as f64 / med,
        "peak_mem_gb": gb(gpu::peak_bytes(&device)),
        "lora_params": n_lora,
        "loss": last_loss,
        "phase_ms": phases,
    }))
}

/// Times sampled generation of `new_tokens` for `batch` prompts of `prompt_len` tokens.
pub fn rollout(
    shape: &ShapeArgs,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
) -> Result<serde_json::Value> {
    let (model, device) = setup(shape, false)?;
    let opts = GenerateOptions {
        sampling: SamplingParams {
            temperature: 1.0,
            seed: shape.seed,
            ..SamplingParams::default()
        },
        max_new_tokens: new_tokens,
        eos_ids: vec![],
        pad_id: 0,
        mode: Mode::EVAL,
    };
    // Warm up (kernels load, the pool grows) on a small call.
    let warm = GenerateOptions {
        max_new_tokens: 4,
        ..opts.clone()
    };
    generate(
        model.as_ref(),
        &ids(2, prompt_len, shape.vocab),
        &warm,
        &|_, _| false,
        &device,
    )?;
    gpu::reset_peak(&device);
    device.synchronize()?;
    let t0 = Instant::now();
    let out = generate(
        model.as_ref(),
        &ids(batch, prompt_len, shape.vocab),
        &opts,
        &|_, _| false,
        &device,
    )?;
    device.synchronize()?;
    let secs = t0.elapsed().as_secs_f64();
    let produced: usize = out.iter().map(|g| g.ids.len()).sum();
    Ok(serde_json::json!({
        "who": "ferrotune",
        "bench": "rollout",
        "layers": shape.layers,
        "vocab": shape.vocab,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "tokens_generated": produced,
        "seconds": secs,
        "tokens_per_s": produced as f64 / secs,
        "peak_mem_gb": gb(gpu::peak_bytes(&device)),
    }))
}
