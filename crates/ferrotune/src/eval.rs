//! Evaluation: perplexity over a token stream, scoring every token once with a sliding window
//! when the text is longer than the window (each window after the first re-reads `stride`
//! tokens of context it does not score). ppl = exp(mean NLL over scored tokens).

use candle_core::{Device, Result};
use ferrotune_generate::next_token_logprobs;
use ferrotune_models::{Batch, CausalLm};
use ferrotune_nn::Mode;

/// Result of a perplexity run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    pub nll_sum: f64,
    pub tokens: usize,
}

impl Perplexity {
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum / self.tokens.max(1) as f64
    }
    pub fn ppl(&self) -> f64 {
        self.mean_nll().exp()
    }
}

/// Perplexity of `ids` (the first token is context only). `window` = longest sequence fed at
/// once; `stride` = how many new tokens each later window scores (stride <= window - 1).
pub fn perplexity(
    model: &dyn CausalLm,
    ids: &[u32],
    window: usize,
    stride: usize,
    mode: Mode,
    device: &Device,
) -> Result<Perplexity> {
    if ids.len() < 2 {
        candle_core::bail!("perplexity needs at least 2 tokens, got {}", ids.len());
    }
    let window = window.max(2);
    let stride = stride.clamp(1, window - 1);
    let mut out = Perplexity {
        nll_sum: 0.0,
        tokens: 0,
    };
    // Tokens 1..n are scored; `scored` counts how many of them are done.
    let n = ids.len();
    let mut scored_to = 1; // next token index to score
    while scored_to < n {
        let end = if scored_to == 1 {
            window.min(n)
        } else {
            (scored_to + stride).min(n)
        };
        let start = end.saturating_sub(window);
        let chunk = ids[start..end].to_vec();
        let batch = Batch::right_padded(&[chunk], 0, device)?;
        let lp = next_token_logprobs(model, &batch, mode)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        // lp[j] scores ids[start + j + 1]
        for (j, &l) in lp.iter().enumerate() {
            let tok = start + j + 1;
            if tok >= scored_to {
                out.nll_sum -= l as f64;
                out.tokens += 1;
            }
        }
        scored_to = end;
    }
    Ok(out)
}

/// The perplexity regression gate: ppl(model) / ppl(base) on a held-out "do not forget" text,
/// checked at every eval step of a training run. The base perplexity is measured once before
/// training starts (fresh adapters are exactly the base).
pub struct RegressionGate {
    pub path: std::path::PathBuf,
    ids: Vec<u32>,
    window: usize,
    pub base_ppl: f64,
    pub max_ratio: f64,
    pub stop: bool,
    device: Device,
    /// The last step whose state passed the gate.
    pub last_good_step: Option<usize>,
}

impl RegressionGate {
    /// Measure the base perplexity of `ids` now.
    pub fn new(
        model: &dyn CausalLm,
        path: std::path::PathBuf,
        ids: Vec<u32>,
        max_ratio: f64,
        stop: bool,
        device: &Device,
    ) -> Result<Self> {
        let window = model.config().max_position_embeddings.min(1024);
        let base = perplexity(model, &ids, window, window / 2, Mode::EVAL, device)?.ppl();
        Ok(RegressionGate {
            path,
            ids,
            window,
            base_ppl: base,
            max_ratio,
            stop,
            device: device.clone(),
            last_good_step: None,
        })
    }

    /// (ppl, ratio, regressed) of the model now.
    pub fn check(&mut self, step: usize, model: &dyn CausalLm) -> Result<(f64, f64, bool)> {
        let ppl = perplexity(
            model,
            &self.ids,
            self.window,
            self.window / 2,
            Mode::EVAL,
            &self.device,
        )?
        .ppl();
        let ratio = ppl / self.base_ppl;
        let bad = ratio > self.max_ratio;
        if !bad {
            self.last_good_step = Some(step);
        }
        Ok((ppl, ratio, bad))
    }
}
