//! Sampling one token from a row of logits: temperature, then top-k, then top-p, as
//! transformers' logits warpers apply them; greedy when temperature is 0. The returned
//! log-prob is taken from softmax(logits / temperature) before top-k/top-p filtering, which is
//! the distribution GRPO's trainer recomputes (TRL does the same).

use rand::rngs::StdRng;
use rand::Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Whether these parameters define a distribution: temperature a finite number >= 0,
    /// top_k >= 1, top_p in (0, 1]. The message names the field.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be a number >= 0 (0 = greedy), got {}",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            return Err("top_k must be at least 1 (leave it out for no top-k)".into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top_p must be in (0, 1], got {p}"));
            }
        }
        Ok(())
    }
}

/// Numerically stable log-softmax of a row.
pub fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    row.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// Sample a token id from `logits`; returns (id, log-prob).
pub fn sample_token(logits: &[f32], p: &SamplingParams, rng: &mut StdRng) -> (u32, f32) {
    if p.temperature <= 0.0 {
        let lp = log_softmax(logits);
        let (best, _) =
            logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |acc, (i, &x)| {
                    if x > acc.1 {
                        (i, x)
                    } else {
                        acc
                    }
                });
        return (best as u32, lp[best]);
    }
    let scaled: Vec<f32> = logits
        .iter()
        .map(|&x| (x as f64 / p.temperature) as f32)
        .collect();
    let lp = log_softmax(&scaled);
    let truncates =
        p.top_k.is_some_and(|k| k > 0 && k < lp.len()) || p.top_p.is_some_and(|x| x < 1.0);
    if !truncates {
        // No truncation: inverse-CDF in vocabulary order (no sort; the GPU sampler,
        // `ferrotune_nn::ops::sample_rows_on_device`, applies the same rule).
        let total: f64 = lp.iter().map(|&l| (l as f64).exp()).sum();
        let mut u = rng.random::<f64>() * total;
        let mut last = 0;
        for (i, &l) in lp.iter().enumerate() {
            let pi = (l as f64).exp();
            if pi > 0.0 {
                last = i;
            }
            u -= pi;
            if u <= 0.0 && pi > 0.0 {
                return (i as u32, l);
            }
        }
        return (last as u32, lp[last]);
    }
    // Candidates sorted by probability, descending (stable on ties: lower id first).
    let mut order: Vec<usize> = (0..lp.len()).collect();
    order.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
    let mut keep = order.len();
    if let Some(k) = p.top_k.filter(|&k| k > 0) {
        keep = keep.min(k);
    }
    if let Some(top_p) = p.top_p.filter(|&x| x < 1.0) {
        let mut cum = 0.0f64;
        for (n, &i) in order.iter().take(keep).enumerate() {
            cum += (lp[i] as f64).exp();
            if cum >= top_p {
                keep = n + 1;
                break;
            }
        }
    }
    let kept = &order[..keep.max(1)];
    let total: f64 = kept.iter().map(|&i| (lp[i] as f64).exp()).sum();
    let mut u = rng.random::<f64>() * total;
    for &i in kept {
        u -= (lp[i] as f64).exp();
        if u <= 0.0 {
            return (i as u32, lp[i]);
        }
    }
    let last = kept[kept.len() - 1];
    (last as u32, lp[last])
}
