//! `ferrotune demo`: the whole post-training recipe on the embedded model, with nothing
//! downloaded. A small Llama pretrained by `ferrotune pretrain` (models/demo) that can barely
//! do arithmetic is (1) evaluated, (2) taught the `<answer>N</answer>` reply format by LoRA SFT,
//! (3) merged, then improved at the arithmetic itself by GRPO with verifiable rewards, and (4)
//! every checkpoint is evaluated on held-out problems (never trained on) and on held-out
//! English text (perplexity, the "do not forget" check). A before/after table, plots and an
//! `index.html` land in the output folder. Every stage is an ordinary ferrotune run with its
//! config written beside it, so a user can rerun any stage by hand.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ferrotune_data::{
    arithmetic_excluding, write_jsonl, ArithmeticSpec, Op, Problem, PromptFormat,
};
use ferrotune_models::LoadOptions;
use ferrotune_report::{write_summary_html, Section};
use ferrotune_rewards::{RewardSet, RewardSpec};
use ferrotune_train::rollout::RewardRole;

use crate::config::RunConfig;
use crate::grpo_run::{load_prompts, role_of};
use crate::lm::Lm;
use crate::task_eval::{eval_task, perplexity_of_file, TaskOptions};

/// Where the embedded model lives: `FERROTUNE_DEMO_MODEL`, else the repository's
/// `models/demo` (known at build time), else `./models/demo`.
pub fn demo_model_dir() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("FERROTUNE_DEMO_MODEL") {
        return Ok(PathBuf::from(p));
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo");
    for p in [built, PathBuf::from("models/demo")] {
        if p.join("config.json").is_file() {
            return Ok(p);
        }
    }
    bail!("the demo model is missing: expected models/demo/config.json in the repository (regenerate it with `ferrotune pretrain --config configs/pretrain-demo.toml`) or set FERROTUNE_DEMO_MODEL")
}

/// Sizes of a demo run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub out: PathBuf,
    pub quick: bool,
    pub seed: u64,
    /// `KEY=VALUE` overrides of the GRPO stage's config (`--set grpo.dynamic_sampling=true`);
    /// the GRPO run folder's `config.toml` records them.
    pub grpo_sets: Vec<String>,
}

/// SFT is kept to the format: 30 steps give a format rate of 1.0 while held-out accuracy stays
/// low (0.19 on seed 0); longer SFT on gold answers teaches the arithmetic itself (0.43 after 150
/// steps), which is GRPO's job in this recipe. GRPO: 16 prompts x 8 completions per step at lr
/// 1e-4. Tried on seed 0 from the 30-step SFT model (held-out accuracy at steps 40/80/120/160):
/// 8 prompts at lr 2e-4 swung 0.34/0.31/0.39/0.29, at lr 1e-4 rose 0.27/0.31/0.34/0.36; on top of
/// a 150-step SFT, lr 5e-5 barely moved the policy (KL < 0.02, +0.05 at best).
struct Sizes {
    sft_steps: usize,
    grpo_steps: usize,
    eval_problems: usize,
    grpo_save_every: usize,
}

impl Sizes {
    fn of(quick: bool) -> Sizes {
        if quick {
            Sizes {
                sft_steps: 30,
                grpo_steps: 10,
                eval_problems: 64,
                grpo_save_every: 5,
            }
        } else {
            Sizes {
                sft_steps: 30,
                grpo_steps: 120,
                eval_problems: 300,
                grpo_save_every: 30,
            }
        }
    }
}

/// The system message of every demo prompt.
const SYSTEM: &str = "Answer with the number inside <answer></answer> tags.";

/// One row of the before/after table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoRow {
    pub stage: String,
    pub accuracy: f64,
    pub format_rate: f64,
    pub mean_reward: f64,
    pub ppl: f64,
    pub ppl_ratio: f64,
    pub regression: bool,
}

/// The demo's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoSummary {
    pub rows: Vec<DemoRow>,
    pub seconds: f64,
    pub out: PathBuf,
}

/// Rewards used for training (GRPO) and for the table.
fn eval_specs() -> Result<Vec<RewardSpec>> {
    let t: toml::Table = toml::from_str(
        r#"r = [
  { name = "answer_match", label = "correct", extract = "answer_tag" },
  { name = "format_tags", label = "format", tags = ["answer"] },
  { name = "numeric_closeness", label = "closeness", extract = "answer_tag" },
]"#,
    )?;
    let arr = t["r"].as_array().cloned().unwrap_or_default();
    arr.into_iter()
        .map(|v| Ok(serde::Deserialize::deserialize(v)?))
        .collect()
}

fn chat_problems(problems: &[Problem], path: &Path) -> Result<()> {
    write_jsonl(
        problems,
        path,
        &PromptFormat::Chat {
            system: Some(SYSTEM.into()),
        },
    )?;
    Ok(())
}

/// SFT rows: the same chat prompt, completion `The answer is <answer>N</answer>.` (the
/// pretrained model already starts replies with "The answer is"; a bare `<answer>` first token
/// fights a prior of ~1e-10 and LoRA SFT cannot move it without wrecking perplexity).
fn sft_rows(problems: &[Problem], path: &Path) -> Result<()> {
    let mut out = String::new();
    for p in problems {
        out.push_str(
            &serde_json::json!({
                "prompt": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": p.prompt},
                ],
                "completion": [{"role": "assistant", "content": format!("The answer is <answer>{}</answer>.", p.answer)}],
            })
            .to_string(),
        );
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("{}: cannot write", path.display()))
}

fn evaluate(
    stage: &str,
    model: &Path,
    adapter: Option<&Path>,
    eval_file: &Path,
    english: &Path,
    base_ppl: Option<f64>,
) -> Result<DemoRow> {
    let opts = LoadOptions {
        dtype: candle_core::DType::F32,
        device: candle_core::Device::Cpu,
        lora: None,
        trainable_base: false,
    };
    let lm = Lm::load_with(model, adapter, &opts)?;
    let specs = eval_specs()?;
    let set = RewardSet::from_specs(&specs)?;
    let roles: Vec<RewardRole> = specs.iter().map(|s| role_of(&s.name)).collect();
    let items = load_prompts(&lm.tokenizer, eval_file, 128)?;
    let r = eval_task(
        &lm,
        &items,
        &set,
        &roles,
        None,
        &TaskOptions {
            max_new_tokens: 24,
            batch_size: 64,
            stop: vec!["</answer>".into()],
            ..TaskOptions::default()
        },
    )?;
    let ppl = perplexity_of_file(&lm, english, None, None)?.ppl();
    let ratio = base_ppl.map_or(1.0, |b| ppl / b);
    Ok(DemoRow {
        stage: stage.into(),
        accuracy: r.accuracy.unwrap_or(f64::NAN),
        format_rate: r.format_rate.unwrap_or(f64::NAN),
        mean_reward: r.mean_reward,
        ppl,
        ppl_ratio: ratio,
        regression: ratio > 1.05,
    })
}

fn print_table(rows: &[DemoRow]) -> String {
    let mut s = format!(
        "{:<22} {:>9} {:>8} {:>8} {:>10} {:>9}\n",
        "stage", "accuracy", "format", "reward", "perplexity", "ppl/base"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<22} {:>9.3} {:>8.3} {:>8.3} {:>10.3} {:>9.3}{}\n",
            r.stage,
            r.accuracy,
            r.format_rate,
            r.mean_reward,
            r.ppl,
            r.ppl_ratio,
            if r.regression { "  REGRESSION" } else { "" }
        ));
    }
    s
}

fn write_config(path: &Path, text: &str, sets: &[String]) -> Result<RunConfig> {
    std::fs::write(path, text).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(RunConfig::load(path, sets)?)
}

/// Run the demo.
pub fn run_demo(opts: &DemoOptions) -> Result<DemoSummary> {
    let t0 = std::time::Instant::now();
    let model = demo_model_dir()?;
    let model = std::path::absolute(&model).unwrap_or(model);
    let heldout = model.join("eval/arithmetic.jsonl");
    let english = model.join("eval/english.txt");
    for f in [&heldout, &english] {
        if !f.is_file() {
            bail!("{}: missing (part of the demo model folder)", f.display());
        }
    }
    let sizes = Sizes::of(opts.quick);
    let out = std::path::absolute(&opts.out).unwrap_or(opts.out.clone());
    if out.exists() && std::fs::read_dir(&out)?.next().is_some() {
        bail!(
            "{}: exists and is not empty; give another --out or delete it",
            out.display()
        );
    }
    let data = out.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("{}: cannot create", data.display()))?;

    // 1. Data: held-out problems (from the model folder: never seen in pretraining), and
    //    training problems that exclude them.
    eprintln!("== data: held-out problems and generated training problems");
    let rows = ferrotune_data::read_rows(&heldout)?;
    let mut eval_problems: Vec<Problem> = Vec::new();
    for r in rows.iter().take(sizes.eval_problems) {
        let prompt = r.fields.get("prompt").and_then(|v| v.as_str());
        let answer = r.fields.get("answer").map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        });
        match (prompt, answer) {
            (Some(p), Some(a)) => eval_problems.push(Problem {
                prompt: p.to_string(),
                answer: a,
            }),
            _ => bail!(
                "{}: line {}: needs string `prompt` and `answer`",
                heldout.display(),
                r.line
            ),
        }
    }
    let exclude: HashSet<String> = eval_problems.iter().map(|p| p.prompt.clone()).collect();
    let spec = |n, seed| ArithmeticSpec {
        n,
        seed,
        digits: (1, 2),
        ops: vec![Op::Add, Op::Sub],
    };
    let sft_train = arithmetic_excluding(&spec(2000, opts.seed + 1), &exclude)?;
    let grpo_train = arithmetic_excluding(&spec(3000, opts.seed + 2), &exclude)?;
    let eval_file = data.join("eval.jsonl");
    chat_problems(&eval_problems, &eval_file)?;
    sft_rows(&sft_train, &data.join("sft.jsonl"))?;
    chat_problems(&grpo_train, &data.join("grpo.jsonl"))?;
    // A small slice of the held-out set for GRPO's periodic eval curve.
    chat_problems(
        &eval_problems[..eval_problems.len().min(32)],
        &data.join("grpo-eval.jsonl"),
    )?;

    // 2. Baseline.
    eprintln!("== evaluate the base model");
    let mut table = vec![evaluate("base", &model, None, &eval_file, &english, None)?];
    let base_ppl = table[0].ppl;
    eprint!("{}", print_table(&table));

    // 3. SFT: the reply format.
    eprintln!("== SFT (LoRA): teach the <answer>N</answer> format");
    let sft_cfg = write_config(
        &out.join("sft.toml"),
        &format!(
            r#"[model]
path = "{model}"

[lora]
r = 16
lora_alpha = 32

[data]
train = "data/sft.jsonl"
max_seq_len = 96

[optim]
learning_rate = 3e-3
lr_scheduler_type = "cosine"
warmup_steps = 5

[run]
output_dir = "sft"
seed = {seed}
max_steps = {steps}
batch_size = 16
log_every = 10

[sft]
"#,
            model = model.display(),
            seed = opts.seed,
            steps = sizes.sft_steps
        ),
        &[],
    )?;
    let sft = crate::sft_run::run_sft(&sft_cfg, false, false)?;
    let sft_ckpt = sft.run.last_checkpoint.context("SFT wrote no checkpoint")?;
    let merged = out.join("sft-merged");
    ferrotune_ckpt::export_merged(&model, Some(&sft_ckpt), &merged, candle_core::DType::F32)?;
    table.push(evaluate(
        "sft",
        &merged,
        None,
        &eval_file,
        &english,
        Some(base_ppl),
    )?);
    eprint!("{}", print_table(&table));

    // 4. GRPO on the merged SFT model (reference = the SFT model: adapters off).
    eprintln!("== GRPO (LoRA): verifiable rewards for the arithmetic itself");
    let grpo_cfg = write_config(
        &out.join("grpo.toml"),
        &format!(
            r#"[model]
path = "{merged}"

[lora]
r = 16
lora_alpha = 32

[data]
train = "data/grpo.jsonl"
eval = "data/grpo-eval.jsonl"

[optim]
learning_rate = 1e-4
lr_scheduler_type = "constant"

[run]
output_dir = "grpo"
seed = {seed}
max_steps = {steps}
batch_size = 32
gradient_accumulation_steps = 4
log_every = 5
save_every = {save_every}
eval_every = {save_every}

[grpo]
num_generations = 8
max_prompt_len = 96
max_completion_len = 24
temperature = 1.0
beta = 0.04
loss_type = "dr_grpo"
stop = ["</answer>"]
rewards = [
  {{ name = "format_tags", weight = 0.25, tags = ["answer"] }},
  {{ name = "answer_match", weight = 1.0, extract = "answer_tag" }},
  {{ name = "numeric_closeness", weight = 0.5, extract = "answer_tag" }},
]
"#,
            merged = merged.display(),
            seed = opts.seed,
            steps = sizes.grpo_steps,
            save_every = sizes.grpo_save_every
        ),
        &opts.grpo_sets,
    )?;
    let grpo = crate::grpo_run::run_grpo(&grpo_cfg, false, false)?;
    let run = ferrotune_ckpt::RunDir::open(&grpo_cfg.run.output_dir)?;
    for step in ferrotune_ckpt::complete_steps(&run)? {
        let ck = run.checkpoints_dir().join(format!("step-{step}"));
        table.push(evaluate(
            &format!("grpo step {step}"),
            &merged,
            Some(&ck),
            &eval_file,
            &english,
            Some(base_ppl),
        )?);
    }
    let text = print_table(&table);
    println!("\n{text}");
    let regress: Vec<&str> = table
        .iter()
        .filter(|r| r.regression)
        .map(|r| r.stage.as_str())
        .collect();
    if !regress.is_empty() {
        println!(
            "warning: perplexity on held-out English rose more than 5% over the base at: {}",
            regress.join(", ")
        );
    }
    // 5. Report: table JSON, plots, index.html.
    let summary = DemoSummary {
        rows: table.clone(),
        seconds: t0.elapsed().as_secs_f64(),
        out: out.clone(),
    };
    std::fs::write(
        out.join("demo.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    let mut plots = Vec::new();
    for (dir, keys) in [
        ("sft", vec!["loss", "lr"]),
        (
            "grpo",
            vec![
                "reward",
                "rewards/format_tags/mean",
                "rewards/answer_match/mean",
                "rewards/numeric_closeness/mean",
                "kl",
                "completions/mean_length",
                "eval/reward",
                "loss",
            ],
        ),
    ] {
        let keys: Vec<&str> = keys.to_vec();
        if let Ok(written) = ferrotune_report::plot_metrics(&out.join(dir), &keys) {
            for p in written {
                if let Ok(rel) = p.strip_prefix(&out) {
                    plots.push(rel.to_path_buf());
                }
            }
        }
    }
    let sections = vec![
        Section::Text {
            heading: "Before / after (held-out problems; perplexity on held-out English)".into(),
            body: text.clone(),
        },
        Section::Table {
            heading: "Run".into(),
            rows: vec![
                ("wall time".into(), format!("{:.0} s", summary.seconds)),
                ("SFT steps".into(), sft.run.steps.to_string()),
                ("GRPO steps".into(), grpo.run.steps.to_string()),
                (
                    "max |ratio - 1| (sampler vs trainer)".into(),
                    format!("{:.1e}", grpo.max_first_ratio_dev),
                ),
            ],
        },
        Section::Plots {
            heading: "Plots".into(),
            paths: plots,
        },
    ];
    write_summary_html(&out, "ferrotune demo", &sections)?;
    println!(
        "demo done in {:.0}s: {} (index.html, plots, demo.json)",
        summary.seconds,
        out.display()
    );
    Ok(summary)
}
