//! RL health checks: turn a GRPO run's numbers into words while it runs. Each check looks at
//! the recent rollouts (and KL) and names a known failure with what to do about it:
//!
//! | code | fires when | usual cause / fix |
//! |---|---|---|
//! | `unscored` | no reward function scored any completion of the latest batch (all None) | the rows lack the columns the rewards read (`answer`, `test`, ...) |
//! | `no_signal` | every group of the latest batch has identical rewards | task too hard/easy or too little exploration: raise temperature or num_generations |
//! | `truncation` | > 20% of completions hit max_completion_len (mean of the last 3 batches) | raise max_completion_len, add a `length` reward, or mask_truncated_completions |
//! | `length_hacking` | mean length grew > 30% over the window while the mean reward moved < 0.02 | the policy pads; check rewards, use dr_grpo/dapo |
//! | `long_wrong` | wrong answers are > 1.5× longer than right ones (last 3 batches) | per-sequence mean (`grpo`) dilutes the penalty of long wrong answers: `dr_grpo`/`dapo` |
//! | `format_hacking` | a format reward is ≥ 0.95 while correctness (< 0.5) moved < 0.02 over the window | the format is learned, the task is not: reweight, or more SFT |
//! | `kl_rising` | KL > 4× its value 5 steps earlier and above 0.05, or above 1.0 | learning rate too high or β too small |
//!
//! A finding is reported when its condition becomes true (not again while it stays true). The
//! thresholds are ours (rules of thumb), documented here and in the findings' text.
//! Owns: the rules. Does not own: printing or files (the caller records findings).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::grpo_loss::LossType;

/// What a reward function measures, for the health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardRole {
    Correctness,
    Format,
    Other,
}

/// One named problem at a step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub code: &'static str,
    pub step: usize,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "health [{}] step {}: {}",
            self.code, self.step, self.message
        )
    }
}

/// What one generation batch looked like. Serializable (a checkpoint keeps the recent ones);
/// JSON has no NaN, so a NaN mean (nothing scored) is written as `null` and read back as NaN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthStats {
    pub step: usize,
    #[serde(with = "nan_as_null")]
    pub reward_mean: f64,
    /// (label, role, mean) per reward function.
    #[serde(with = "nan_as_null")]
    pub reward_means: Vec<(String, RewardRole, f64)>,
    #[serde(with = "nan_as_null")]
    pub len_mean: f64,
    pub len_right: Option<f64>,
    pub len_wrong: Option<f64>,
    #[serde(with = "nan_as_null")]
    pub truncated_frac: f64,
    #[serde(with = "nan_as_null")]
    pub zero_std_frac: f64,
    pub kl: Option<f64>,
    /// Multi-turn tool use, when the run has tools (absent in older checkpoints).
    #[serde(default)]
    pub tools: Option<ToolHealth>,
}

/// How one generation batch used its tools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolHealth {
    /// Calls per completion (TRL's `tools/call_frequency`).
    pub calls_per_completion: f64,
    /// Failed calls per call (TRL's `tools/failure_frequency`).
    pub failure_frac: f64,
    /// Completions that ended at `max_tool_calling_iterations` with a call still unanswered:
    /// the policy wanted another round.
    #[serde(alias = "all_rounds_frac")]
    pub unanswered_frac: f64,
}

/// Keeps the recent history (as much as the rules look at) and which findings are active.
/// Saved in GRPO checkpoints, so a resumed run neither repeats nor misses a finding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthMonitor {
    loss_type: LossType,
    rollouts: Vec<HealthStats>,
    #[serde(with = "nan_as_null")]
    kls: Vec<(usize, f64)>,
    active: Vec<String>,
}

/// Serde for f64 values that may be NaN (JSON `null`), alone or inside a list of tuples.
mod nan_as_null {
    use super::*;

    /// An f64, or tuples/lists holding f64 last.
    pub trait NanNull: Sized {
        type Repr: Serialize + for<'de> Deserialize<'de>;
        fn to_repr(&self) -> Self::Repr;
        fn from_repr(r: Self::Repr) -> Self;
    }
    impl NanNull for f64 {
        type Repr = Option<f64>;
        fn to_repr(&self) -> Option<f64> {
            self.is_finite().then_some(*self)
        }
        fn from_repr(r: Option<f64>) -> f64 {
            r.unwrap_or(f64::NAN)
        }
    }
    impl<
            A: Clone + Serialize + for<'de> Deserialize<'de>,
            B: Clone + Serialize + for<'de> Deserialize<'de>,
        > NanNull for (A, B, f64)
    {
        type Repr = (A, B, Option<f64>);
        fn to_repr(&self) -> Self::Repr {
            (self.0.clone(), self.1.clone(), self.2.to_repr())
        }
        fn from_repr(r: Self::Repr) -> Self {
            (r.0, r.1, f64::from_repr(r.2))
        }
    }
    impl NanNull for (usize, f64) {
        type Repr = (usize, Option<f64>);
        fn to_repr(&self) -> Self::Repr {
            (self.0, self.1.to_repr())
        }
        fn from_repr(r: Self::Repr) -> Self {
            (r.0, f64::from_repr(r.1))
        }
    }
    impl<T: NanNull> NanNull for Vec<T> {
        type Repr = Vec<T::Repr>;
        fn to_repr(&self) -> Self::Repr {
            self.iter().map(NanNull::to_repr).collect()
        }
        fn from_repr(r: Self::Repr) -> Self {
            r.into_iter().map(T::from_repr).collect()
        }
    }

    pub fn serialize<T: NanNull, S: Serializer>(x: &T, s: S) -> Result<S::Ok, S::Error> {
        x.to_repr().serialize(s)
    }

    pub fn deserialize<'de, T: NanNull, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        T::Repr::deserialize(d).map(T::from_repr)
    }
}

const WINDOW: usize = 16;
/// KL values kept: the latest and the one 5 steps before it.
const KL_KEPT: usize = 6;
const MIN_TREND: usize = 8;

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

impl HealthMonitor {
    pub fn new(loss_type: LossType) -> Self {
        HealthMonitor {
            loss_type,
            rollouts: Vec::new(),
            kls: Vec::new(),
            active: Vec::new(),
        }
    }

    pub fn push_rollout(&mut self, s: HealthStats) {
        self.rollouts.push(s);
        // The rules look at the last WINDOW batches at most.
        let extra = self.rollouts.len().saturating_sub(WINDOW);
        self.rollouts.drain(..extra);
    }

    pub fn push_kl(&mut self, step: usize, kl: f64) {
        self.kls.push((step, kl));
        // kl_rising compares with the value 5 steps earlier.
        let extra = self.kls.len().saturating_sub(KL_KEPT);
        self.kls.drain(..extra);
    }

    /// The loss type named in the findings' advice (a resumed run may have changed it).
    pub fn set_loss_type(&mut self, loss_type: LossType) {
        self.loss_type = loss_type;
    }

    /// Conditions that hold now, with their messages.
    fn conditions(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let Some(last) = self.rollouts.last() else {
            return out;
        };
        if last.reward_mean.is_nan() {
            // TRL warns the same way: every reward function returned None for every sample.
            out.push((
                "unscored",
                "no reward function scored any completion (each said \"not applicable\"), so nothing is learned: the rows lack the columns the rewards read (answer_match and numeric_closeness: `answer` or their `field`; code_tests: `test` + `entry_point`, or `test_list`)".to_string(),
            ));
        }
        if last.zero_std_frac >= 1.0 {
            out.push((
                "no_signal",
                format!(
                    "every group got identical rewards (mean reward {:.3}): no learning signal; raise temperature or num_generations, or change the task difficulty",
                    last.reward_mean
                ),
            ));
        }
        let recent = &self.rollouts[self.rollouts.len().saturating_sub(3)..];
        let trunc = mean(recent.iter().map(|r| r.truncated_frac));
        if trunc > 0.2 {
            out.push((
                "truncation",
                format!(
                    "{:.0}% of completions hit max_completion_len: raise it, add a `length` reward, or set mask_truncated_completions",
                    trunc * 100.0
                ),
            ));
        }
        let pairs: Vec<(f64, f64)> = recent
            .iter()
            .filter_map(|r| Some((r.len_right?, r.len_wrong?)))
            .collect();
        if !pairs.is_empty() {
            let right = mean(pairs.iter().map(|p| p.0));
            let wrong = mean(pairs.iter().map(|p| p.1));
            if wrong > 1.5 * right {
                let advice = if matches!(self.loss_type, LossType::Grpo | LossType::Sapo) {
                    "this loss_type averages per sequence, so each token of a long wrong answer is penalised less; dr_grpo or dapo remove that bias"
                } else {
                    "check whether long answers ramble"
                };
                out.push((
                    "long_wrong",
                    format!(
                        "wrong answers are {:.1}x longer than right ones ({wrong:.0} vs {right:.0} tokens): {advice}",
                        wrong / right.max(1e-9)
                    ),
                ));
            }
        }
        let win = &self.rollouts[self.rollouts.len().saturating_sub(WINDOW)..];
        if win.len() >= MIN_TREND {
            let h = win.len() / 2;
            let (a, b) = (&win[..h], &win[h..]);
            let len_a = mean(a.iter().map(|r| r.len_mean));
            let len_b = mean(b.iter().map(|r| r.len_mean));
            let rew_a = mean(a.iter().map(|r| r.reward_mean));
            let rew_b = mean(b.iter().map(|r| r.reward_mean));
            if len_b > 1.3 * len_a && rew_b - rew_a < 0.02 {
                out.push((
                    "length_hacking",
                    format!(
                        "completion length grew {len_a:.0} → {len_b:.0} tokens while mean reward stayed flat ({rew_a:.3} → {rew_b:.3}): the policy may be padding"
                    ),
                ));
            }
            let role_mean = |part: &[HealthStats], role: RewardRole| -> Option<(String, f64)> {
                let label = part
                    .last()?
                    .reward_means
                    .iter()
                    .find(|(_, r, m)| *r == role && m.is_finite())?
                    .0
                    .clone();
                let m = mean(part.iter().filter_map(|r| {
                    r.reward_means
                        .iter()
                        .find(|(l, _, m)| *l == label && m.is_finite())
                        .map(|x| x.2)
                }));
                Some((label, m))
            };
            if let (Some((fl, fb)), Some((cl, ca)), Some((_, cb))) = (
                role_mean(b, RewardRole::Format),
                role_mean(a, RewardRole::Correctness),
                role_mean(b, RewardRole::Correctness),
            ) {
                if fb >= 0.95 && cb < 0.5 && cb - ca < 0.02 {
                    out.push((
                        "format_hacking",
                        format!(
                            "`{fl}` is saturated ({fb:.2}) while `{cl}` is flat ({ca:.2} → {cb:.2}): the format is learned, the task is not; lower the format weight or add SFT"
                        ),
                    ));
                }
            }
        }
        let tools: Vec<&ToolHealth> = recent.iter().filter_map(|r| r.tools.as_ref()).collect();
        if !tools.is_empty() {
            let fail = mean(tools.iter().map(|t| t.failure_frac));
            if fail > 0.5 {
                out.push((
                    "tool_errors",
                    format!(
                        "{:.0}% of tool calls failed (unknown tool, arguments that do not fit, malformed JSON, a program that crashed or timed out): the replies in completions.jsonl `turns` say which",
                        fail * 100.0
                    ),
                ));
            }
            let unanswered = mean(tools.iter().map(|t| t.unanswered_frac));
            if unanswered > 0.5 {
                out.push((
                    "tool_loop",
                    format!(
                        "{:.0}% of completions were still calling a tool when max_tool_calling_iterations ran out: the policy may be calling tools in a loop instead of answering",
                        unanswered * 100.0
                    ),
                ));
            }
        }
        let win_tools: Vec<&ToolHealth> = win.iter().filter_map(|r| r.tools.as_ref()).collect();
        if win_tools.len() >= MIN_TREND && win_tools.iter().all(|t| t.calls_per_completion == 0.0) {
            out.push((
                "tool_unused",
                format!(
                    "no completion called a tool in the last {} generation batches: teach the call format first (a short SFT), and check the prompt shows the tools (a template without tool syntax, like SmolLM2's, does not list them: describe them in the system message)",
                    win_tools.len()
                ),
            ));
        }
        if let Some(&(_, kl)) = self.kls.last() {
            let before = self.kls.len().checked_sub(6).map(|i| self.kls[i].1);
            let fast = before.is_some_and(|b| kl > 4.0 * b && kl > 0.05);
            if kl > 1.0 || fast {
                out.push((
                    "kl_rising",
                    format!(
                        "KL to the reference is {kl:.3}{}: lower the learning rate or raise beta",
                        before
                            .map(|b| format!(" (was {b:.3} 5 steps ago)"))
                            .unwrap_or_default()
                    ),
                ));
            }
        }
        out
    }

    /// New findings (conditions that just became true).
    pub fn check(&mut self) -> Vec<Finding> {
        let step = self
            .rollouts
            .last()
            .map(|r| r.step)
            .max(self.kls.last().map(|k| k.0))
            .unwrap_or(0);
        let now = self.conditions();
        let fresh: Vec<Finding> = now
            .iter()
            .filter(|(c, _)| !self.active.iter().any(|a| a == c))
            .map(|(c, m)| Finding {
                code: c,
                step,
                message: m.clone(),
            })
            .collect();
        self.active = now.iter().map(|(c, _)| c.to_string()).collect();
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(step: usize, reward: f64, len: f64) -> HealthStats {
        HealthStats {
            step,
            reward_mean: reward,
            reward_means: vec![
                ("format_tags".into(), RewardRole::Format, 1.0),
                ("answer_match".into(), RewardRole::Correctness, 0.1),
            ],
            len_mean: len,
            len_right: Some(10.0),
            len_wrong: Some(12.0),
            truncated_frac: 0.0,
            zero_std_frac: 0.0,
            kl: None,
            tools: None,
        }
    }

    /// The tool rules: a policy that never calls, one that loops on the tool, one whose calls
    /// fail — each named once, and a healthy tool user gets none.
    #[test]
    fn tool_misuse_is_named() {
        let with_tools = |step, calls, fail, unanswered| {
            let mut h = HealthStats {
                tools: Some(ToolHealth {
                    calls_per_completion: calls,
                    failure_frac: fail,
                    unanswered_frac: unanswered,
                }),
                ..stats(step, 0.1 * step as f64, 20.0)
            };
            h.reward_means[1].2 = 0.1 * step as f64; // correctness rises: no format_hacking
            h
        };
        let codes = |m: &mut HealthMonitor| -> Vec<&'static str> {
            m.check().iter().map(|f| f.code).collect()
        };
        let mut healthy = HealthMonitor::new(LossType::Dapo);
        for s in 1..=10 {
            healthy.push_rollout(with_tools(s, 1.2, 0.1, 0.0));
            assert!(codes(&mut healthy).is_empty());
        }
        let mut unused = HealthMonitor::new(LossType::Dapo);
        let mut seen = Vec::new();
        for s in 1..=10 {
            unused.push_rollout(with_tools(s, 0.0, 0.0, 0.0));
            seen.extend(codes(&mut unused));
        }
        assert_eq!(seen, vec!["tool_unused"]);
        let mut looping = HealthMonitor::new(LossType::Dapo);
        looping.push_rollout(with_tools(1, 3.0, 0.0, 0.9));
        assert_eq!(codes(&mut looping), vec!["tool_loop"]);
        let mut failing = HealthMonitor::new(LossType::Dapo);
        failing.push_rollout(with_tools(1, 1.0, 0.8, 0.0));
        assert_eq!(codes(&mut failing), vec!["tool_errors"]);
        // A checkpoint written before tools were tracked still loads.
        let mut old = serde_json::to_value(stats(1, 0.1, 20.0)).unwrap();
        old.as_object_mut().unwrap().remove("tools");
        let back: HealthStats = serde_json::from_value(old).unwrap();
        assert_eq!(back.tools, None);
    }

    #[test]
    fn healthy_run_has_no_findings_and_each_problem_is_named_once() {
        let mut m = HealthMonitor::new(LossType::Grpo);
        for s in 1..=4 {
            let mut h = stats(s, 0.1 * s as f64, 20.0);
            h.reward_means[0].2 = 0.5;
            h.reward_means[1].2 = 0.1 * s as f64;
            m.push_rollout(h);
            assert!(m.check().is_empty());
        }
        // All groups flat → no_signal, reported once while it lasts.
        let mut h = stats(5, 0.4, 20.0);
        h.zero_std_frac = 1.0;
        m.push_rollout(h.clone());
        let f = m.check();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].code, "no_signal");
        h.step = 6;
        m.push_rollout(h);
        assert!(m.check().is_empty());
        // Nothing scored (every reward None): a NaN mean reward is named, not passed over.
        let mut h = stats(7, f64::NAN, 20.0);
        h.reward_means.iter_mut().for_each(|r| r.2 = f64::NAN);
        m.push_rollout(h);
        let codes: Vec<&str> = m.check().iter().map(|f| f.code).collect();
        assert_eq!(codes, ["unscored"]);
    }

    /// A checkpoint keeps the monitor (NaN means included, as JSON nulls): the restored one
    /// reports exactly what the original reports next, and the history stays bounded.
    #[test]
    fn monitor_survives_a_json_round_trip_and_keeps_a_bounded_history() {
        let mut m = HealthMonitor::new(LossType::Grpo);
        for s in 1..=40 {
            let mut h = stats(s, 1.0, 20.0 + s as f64);
            if s % 7 == 0 {
                h.reward_mean = f64::NAN;
                h.reward_means[1].2 = f64::NAN;
            }
            h.truncated_frac = if s > 30 { 0.5 } else { 0.0 };
            m.push_rollout(h);
            m.push_kl(s, 0.001 * s as f64);
            m.check();
        }
        assert_eq!(m.rollouts.len(), WINDOW);
        assert_eq!(m.kls.len(), KL_KEPT);
        let json = serde_json::to_string(&m).unwrap();
        let mut back: HealthMonitor = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        assert!(back.rollouts[10].reward_mean.is_nan()); // steps 25..=40 kept: index 10 is step 35
        for s in 41..=50 {
            let mut h = stats(s, 0.2, 90.0);
            h.zero_std_frac = if s % 3 == 0 { 1.0 } else { 0.0 };
            for mon in [&mut m, &mut back] {
                mon.push_rollout(h.clone());
                mon.push_kl(s, 0.5);
            }
            assert_eq!(m.check(), back.check(), "step {s}");
        }
    }

    #[test]
    fn length_hacking_format_hacking_long_wrong_truncation_and_kl() {
        let mut m = HealthMonitor::new(LossType::Grpo);
        for s in 1..=10 {
            let mut h = stats(s, 1.0, 20.0 + 10.0 * s as f64);
            h.len_wrong = Some(40.0);
            h.truncated_frac = if s > 7 { 0.5 } else { 0.0 };
            m.push_rollout(h);
            m.push_kl(s, 0.01 * 2f64.powi(s as i32));
        }
        let codes: Vec<&str> = m.check().iter().map(|f| f.code).collect();
        for c in [
            "length_hacking",
            "format_hacking",
            "long_wrong",
            "truncation",
            "kl_rising",
        ] {
            assert!(codes.contains(&c), "{c} missing from {codes:?}");
        }
    }
}
