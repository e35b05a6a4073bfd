//! PPO's value head and the one forward that reads both the policy's log-probs and the head's
//! values (see `ppo.rs` for why the head sits on the policy's body).
//!
//! Owns: the head's parameters, their checkpoint names (TRL's `ValueHead`), and the slot layout
//! of log-probs and values. Does not own: the PPO loop or its losses.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use ferrotune_data::Collated;
use ferrotune_generate::Generation;
use ferrotune_models::CausalLm;
use ferrotune_nn::{ops, Mode};

use crate::error::{Result, TrainError};
use crate::loss::refuse_lm_head_lora;
use crate::rollout::{micro_batch, to_rows, Env, Split};
use crate::trainer::batch_tensors;

/// The value head's file in a checkpoint folder.
pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";
/// TRL `ValueHead.summary` (`nn.Linear(H, 1)`) weight, (1, H).
pub const V_HEAD_WEIGHT: &str = "v_head.summary.weight";
/// TRL `ValueHead.summary` bias, (1,).
pub const V_HEAD_BIAS: &str = "v_head.summary.bias";

/// The scalar value head (module docs).
pub struct ValueHead {
    /// (1, H) f32.
    pub weight: Var,
    /// (1,) f32.
    pub bias: Var,
}

impl ValueHead {
    /// A zero head for hidden size `hidden`.
    pub fn zeros(hidden: usize, device: &Device) -> candle_core::Result<Self> {
        Ok(ValueHead {
            weight: Var::zeros((1, hidden), DType::F32, device)?,
            bias: Var::zeros(1, DType::F32, device)?,
        })
    }

    /// Values (N,) f32 of hidden states (N, H) in any float dtype.
    pub fn forward(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let v = h
            .to_dtype(DType::F32)?
            .matmul(&self.weight.as_tensor().t()?)?; // (N, 1)
        v.broadcast_add(self.bias.as_tensor())?.squeeze(1) // (N,)
    }

    /// The trainable parameters under TRL's names.
    pub fn params(&self) -> Vec<(String, Var)> {
        vec![
            (V_HEAD_WEIGHT.into(), self.weight.clone()),
            (V_HEAD_BIAS.into(), self.bias.clone()),
        ]
    }

    /// The head as named CPU tensors, for a checkpoint.
    pub fn tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        self.params()
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().to_device(&Device::Cpu)?)))
            .collect()
    }

    /// Set the head from saved tensors (`origin` names the file in errors).
    pub fn restore(&self, saved: &[(String, Tensor)], origin: &Path) -> Result<()> {
        for (name, var) in self.params() {
            let state = |msg: String| TrainError::State {
                path: origin.display().to_string(),
                msg,
            };
            let t = saved
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| state(format!("no {name} in the value head file")))?;
            if t.dims() != var.dims() {
                return Err(state(format!(
                    "{name} has shape {:?}, the value head {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }
}

/// Completions of the rollout as one right-padded prompt + completion batch.
pub(crate) struct MicroBatch {
    c: Collated,
    /// Prompt and completion tokens per row.
    prompt_lens: Vec<usize>,
    lens: Vec<usize>,
    /// Response slots T of the whole rollout batch (its longest completion).
    width: usize,
}

impl MicroBatch {
    /// Completions `idx` of the rollout.
    pub(crate) fn new(
        env: &dyn Env,
        items: &[usize],
        gens: &[Generation],
        idx: &[usize],
        width: usize,
        pad_id: u32,
    ) -> Self {
        let its: Vec<usize> = idx.iter().map(|&j| items[j]).collect();
        let gs: Vec<Generation> = idx.iter().map(|&j| gens[j].clone()).collect();
        let (c, lens) = micro_batch(env, Split::Train, &its, &gs, pad_id);
        let prompt_lens = its
            .iter()
            .map(|&i| env.prompt_ids(Split::Train, i).len())
            .collect();
        MicroBatch {
            c,
            prompt_lens,
            lens,
            width,
        }
    }
}

/// Log-probs of the response tokens under softmax(logits / temperature) (when `want_lp`) and
/// values (when `head` is given) of a micro-batch, from one forward; both (B, T), zero outside
/// each row's slots. Slot t of row i is read at hidden position `p_i − 1 + t`: the state before
/// response token t, so slot `len_i` (the value mask's extra slot) is the state after the last
/// token.
pub(crate) fn policy_forward(
    model: &dyn CausalLm,
    head: Option<&ValueHead>,
    mb: &MicroBatch,
    temperature: f64,
    want_lp: bool,
    mode: Mode,
    device: &Device,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    if want_lp {
        refuse_lm_head_lora(model, mode)?;
    }
    let (c, width) = (&mb.c, mb.width);
    let batch = batch_tensors(c, device)?;
    let h = model.hidden(&batch, None, mode)?; // (B, S, H)
    let (b, s, hd) = h.dims3()?;
    let flat = h.reshape((b * s, hd))?; // (B·S, H)
    let flat = if mode.train { flat } else { flat.detach() };
    let (mut lp_pos, mut targets, mut v_pos, mut v_lens) = (vec![], vec![], vec![], vec![]);
    for i in 0..b {
        let (p, l) = (mb.prompt_lens[i], mb.lens[i]);
        for t in 0..l {
            lp_pos.push((i * s + p - 1 + t) as u32);
            targets.push(c.ids[i][p + t]);
        }
        let vl = (l + 1).min(width);
        v_lens.push(vl);
        v_pos.extend((0..vl).map(|t| (i * s + p - 1 + t) as u32));
    }
    let lp = if want_lp {
        let sel = flat.index_select(&Tensor::new(lp_pos, device)?, 0)?; // (N, H)
        let targets = Tensor::new(targets, device)?;
        let lp = ops::token_logprobs(&sel, &model.lm_head().weight, &targets, temperature)?;
        Some(to_rows(&lp.to_dtype(DType::F32)?, &mb.lens, width)?) // (B, T)
    } else {
        None
    };
    let values = match head {
        Some(head) => {
            let sel = flat.index_select(&Tensor::new(v_pos, device)?, 0)?; // (M, H)
            Some(to_rows(&head.forward(&sel)?, &v_lens, width)?) // (B, T)
        }
        None => None,
    };
    Ok((lp, values))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn value_head_is_a_linear_map_and_round_trips() {
        let dev = Device::Cpu;
        let head = ValueHead::zeros(3, &dev).unwrap();
        head.weight
            .set(&Tensor::new(&[[1f32, -2., 0.5]], &dev).unwrap())
            .unwrap();
        head.bias
            .set(&Tensor::new(&[0.25f32], &dev).unwrap())
            .unwrap();
        let h = Tensor::new(&[[1f32, 1., 2.], [0., 0.5, -2.]], &dev).unwrap(); // (2, 3)
        let v = head.forward(&h).unwrap().to_vec1::<f32>().unwrap();
        // 1 - 2 + 1 + 0.25 = 0.25; 0 - 1 - 1 + 0.25 = -1.75
        assert_eq!(v, vec![0.25, -1.75]);
        let saved = head.tensors().unwrap();
        assert_eq!(
            saved.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            vec![V_HEAD_WEIGHT, V_HEAD_BIAS]
        );
        let other = ValueHead::zeros(3, &dev).unwrap();
        other.restore(&saved, Path::new("v.safetensors")).unwrap();
        assert_eq!(other.forward(&h).unwrap().to_vec1::<f32>().unwrap(), v);
        let wrong = ValueHead::zeros(4, &dev).unwrap();
        let e = wrong
            .restore(&saved, Path::new("v.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(V_HEAD_WEIGHT) && e.contains("shape"), "{e}");
    }

    /// The response slots are where the loss expects them: log-probs equal the ones the shared
    /// scorer (`loss::scored_logprobs`, by loss mask) gives for the completion tokens, and the
    /// value at slot t is the head applied to the hidden state at position p − 1 + t, for
    /// t ≤ len (the value mask), with zeros beyond.
    #[test]
    fn slots_line_up_with_the_tokens_and_states_they_score() {
        let dev = Device::Cpu;
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/tiny-chat/model");
        let model = ferrotune_models::load(&dir, &Default::default())
            .unwrap()
            .model;
        let rows = [
            (vec![5u32, 9, 13], vec![20u32, 21, 2]),
            (vec![7, 8], vec![30]),
        ];
        let seqs: Vec<ferrotune_data::Tokenized> = rows
            .iter()
            .map(|(p, c)| ferrotune_data::Tokenized {
                ids: [p.clone(), c.clone()].concat(),
                loss_mask: [vec![0u8; p.len()], vec![1u8; c.len()]].concat(),
                truncated: false,
                tokens_dropped: 0,
            })
            .collect();
        let refs: Vec<&ferrotune_data::Tokenized> = seqs.iter().collect();
        let c = ferrotune_data::collate_right(&refs, 0);
        let mb = MicroBatch {
            c: c.clone(),
            prompt_lens: vec![3, 2],
            lens: vec![3, 1],
            width: 4,
        };
        let head = ValueHead::zeros(64, &dev).unwrap();
        let w: Vec<f32> = (0..64)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0)
            .collect();
        head.weight
            .set(&Tensor::from_vec(w.clone(), (1, 64), &dev).unwrap())
            .unwrap();
        head.bias
            .set(&Tensor::new(&[0.5f32], &dev).unwrap())
            .unwrap();
        let (lp, v) = policy_forward(
            model.as_ref(),
            Some(&head),
            &mb,
            0.7,
            true,
            Mode::EVAL,
            &dev,
        )
        .unwrap();
        let (lp, v) = (lp.unwrap().to_vec2::<f32>().unwrap(), v.unwrap());
        let v = v.to_vec2::<f32>().unwrap();
        let batch = batch_tensors(&c, &dev).unwrap();
        let (want, _) =
            crate::loss::scored_logprobs(model.as_ref(), &batch, &c.loss_mask, 0.7, Mode::EVAL)
                .unwrap();
        let want = want.to_vec1::<f32>().unwrap();
        assert_eq!(lp[0][..3], want[..3]);
        assert_eq!(lp[1][..1], want[3..4]);
        assert_eq!((lp[0][3], &lp[1][1..]), (0.0, &[0.0f32, 0.0, 0.0][..]));
        let h = model
            .hidden(&batch, None, Mode::EVAL)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap(); // (B, S, H)
        let value_at =
            |i: usize, pos: usize| h[i][pos].iter().zip(&w).map(|(a, b)| a * b).sum::<f32>() + 0.5;
        // Row 0: prompt 3, len 3: slots 0..=3 read positions 2..=5 (width 4 holds all).
        // Row 1: prompt 2, len 1: slots 0..=1 read positions 1..=2, then zeros.
        let want_v = [
            vec![
                value_at(0, 2),
                value_at(0, 3),
                value_at(0, 4),
                value_at(0, 5),
            ],
            vec![value_at(1, 1), value_at(1, 2), 0.0, 0.0],
        ];
        for (got, want) in v.iter().zip(&want_v) {
            for (a, b) in got.iter().zip(want) {
                assert!((a - b).abs() < 1e-5, "values {v:?} != {want_v:?}");
            }
        }
    }
}
