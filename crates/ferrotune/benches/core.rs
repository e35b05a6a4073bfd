//! CPU benchmark of the model core on a real model (a GGUF dequantized to f32: SmolLM2-135M-Instruct
//! or Gemma 3 270M): forward tokens/s, LoRA forward+backward step tokens/s, generation tokens/s,
//! and the process's peak RSS. bench/cpu/run.sh runs each phase in its own process next to the
//! same phase in PyTorch (transformers + peft) and prints the ratios.
//!
//! cargo bench --bench core -- PHASE   (PHASE = forward | step | generate)
//! Env: BENCH_GGUF (model; default FERROTUNE_SMOLLM2_GGUF), BENCH_B, BENCH_T, BENCH_ITERS.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use ferrotune_generate::{generate, GenerateOptions, SamplingParams};
use ferrotune_models::{load, Batch, LoadOptions};
use ferrotune_nn::{ops, LoraConfig, Mode, TargetModules};

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Deterministic pseudo-random ids in [100, 20000) (same formula as torch_core.py).
fn ids(b: usize, t: usize) -> Vec<Vec<u32>> {
    (0..b)
        .map(|i| {
            (0..t)
                .map(|j| (100 + (i * 7919 + j * 104_729) % 19_900) as u32)
                .collect()
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    ferrotune_nn::init_cpu_threads();
    let phase = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_else(|| "forward".into());
    let model_path = PathBuf::from(
        std::env::var("BENCH_GGUF")
            .or_else(|_| std::env::var("FERROTUNE_SMOLLM2_GGUF"))
            .map_err(|_| {
                anyhow::anyhow!(
                    "set BENCH_GGUF or FERROTUNE_SMOLLM2_GGUF (scripts/fetch-smollm2.sh)"
                )
            })?,
    );
    let model_name = model_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (b, t) = (env_usize("BENCH_B", 4), env_usize("BENCH_T", 128));
    let iters = env_usize("BENCH_ITERS", 5);
    let dev = Device::Cpu;
    let lora = LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.0,
        use_rslora: false,
        target_modules: TargetModules::Names(
            [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ),
    };
    let opts = LoadOptions {
        dtype: DType::F32,
        device: dev.clone(),
        lora: (phase == "step").then_some((lora, 0)),
        trainable_base: false,
    };
    let model = load(&model_path, &opts)?.model;
    let batch = Batch::right_padded(&ids(b, t), 0, &dev)?;
    let (secs, tokens): (Vec<f64>, usize) = match phase.as_str() {
        "forward" => {
            let mut s = vec![];
            for _ in 0..iters + 1 {
                let t0 = Instant::now();
                let h = model.hidden(&batch, None, Mode::EVAL)?;
                let logits = model.lm_head().forward(&h, Mode::EVAL)?;
                let _ = logits.sum_all()?.to_scalar::<f32>()?;
                s.push(t0.elapsed().as_secs_f64());
            }
            (s[1..].to_vec(), b * t)
        }
        "step" => {
            let vars: Vec<Var> = model
                .linear_slots()
                .iter()
                .filter_map(|s| s.lora.as_ref())
                .flat_map(|l| [l.a.clone(), l.b.clone()])
                .collect();
            let targets: Vec<u32> = ids(b, t).iter().flat_map(|r| r[1..].to_vec()).collect();
            let rows: Vec<u32> = (0..b)
                .flat_map(|i| (0..t - 1).map(move |j| (i * t + j) as u32))
                .collect();
            let targets = Tensor::new(targets, &dev)?;
            let rows = Tensor::new(rows, &dev)?;
            let mut s = vec![];
            for _ in 0..iters + 1 {
                let t0 = Instant::now();
                let h = model.hidden(&batch, None, Mode::TRAIN)?; // (B, T, H)
                let (bb, tt, hh) = h.dims3()?;
                let h = h.reshape((bb * tt, hh))?.index_select(&rows, 0)?;
                let lp = ops::token_logprobs(&h, &model.lm_head().weight, &targets, 1.0)?;
                let loss = (lp.mean_all()?.neg())?;
                let grads = loss.backward()?;
                for v in &vars {
                    if let Some(g) = grads.get(v.as_tensor()) {
                        v.set(&(v.as_tensor() - (g * 1e-4)?)?)?;
                    }
                }
                s.push(t0.elapsed().as_secs_f64());
            }
            (s[1..].to_vec(), b * t)
        }
        "generate" => {
            let new = env_usize("BENCH_NEW", 64);
            let prompts: Vec<Vec<u32>> = ids(b, 32);
            let gopts = GenerateOptions {
                sampling: SamplingParams {
                    temperature: 0.0,
                    ..SamplingParams::default()
                },
                max_new_tokens: new,
                eos_ids: vec![],
                pad_id: 0,
                mode: Mode::EVAL,
            };
            let mut s = vec![];
            for _ in 0..iters.min(3) + 1 {
                let t0 = Instant::now();
                let g = generate(model.as_ref(), &prompts, &gopts, &|_, _| false, &dev)?;
                assert_eq!(g[0].ids.len(), new);
                s.push(t0.elapsed().as_secs_f64());
            }
            (s[1..].to_vec(), b * new)
        }
        other => anyhow::bail!("unknown phase `{other}` (forward | step | generate)"),
    };
    let med = median(secs);
    println!(
        "{{\"impl\": \"ferrotune\", \"model\": \"{model_name}\", \"phase\": \"{phase}\", \"B\": {b}, \"T\": {t}, \"median_s\": {med:.4}, \"tokens_per_s\": {:.1}, \"peak_rss_mb\": {:.0}}}",
        tokens as f64 / med,
        peak_rss_mb()
    );
    Ok(())
}
