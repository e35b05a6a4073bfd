//! Preference-pair tokenization for DPO: an [`Example::Preference`] → two sequences, prompt +
//! chosen and prompt + rejected, each with a mask on its completion tokens only, truncated to
//! `max_length` from the end (TRL 1.16's only `truncation_mode`, `keep_start`).
//!
//! Follows TRL 1.16 `DPOTrainer._prepare_dataset` exactly (checked by `tests/pref.rs` against
//! `fixtures/dpo/make_pref_tokenize.py`, which runs TRL's own code):
//! - plain text: EOS (as text) is appended to `chosen`/`rejected` unless already there; the
//!   prompt and prompt + completion are each tokenized as one string (with the tokenizer's
//!   special-token rule);
//! - conversational: the prompt is rendered with the generation prompt, prompt + completion
//!   without, both through the model's chat template;
//! - the completion starts where the tokenized prompt and *both* tokenized prompt + completion
//!   sequences stop agreeing (TRL's `common_prefix_length`), so a token merged across the
//!   boundary or a template that renders the prompt differently alone is handled as TRL does.
//!
//! It owns no batching and no log-prob math.

use ferrotune_tokenize::{Message, Tokenizer};

use crate::error::{DataError, Result};
use crate::example::{Example, Segment};
use crate::sft::Tokenized;

/// One tokenized preference pair; `loss_mask` marks the completion tokens scored by DPO.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PrefPair {
    pub chosen: Tokenized,
    pub rejected: Tokenized,
}

/// A tokenized preference set: `items[k]` came from `examples[source[k]]`.
#[derive(Clone, Debug, Default)]
pub struct PrefSet {
    pub items: Vec<PrefPair>,
    pub source: Vec<usize>,
    /// Pairs with at least one side cut by `max_length`.
    pub truncated: usize,
    /// Pairs dropped because truncation left a side with no completion token.
    pub dropped: usize,
    /// Examples (indices into the input) whose kept pair has the same tokens on both sides:
    /// they train nothing (the DPO gradient of a pair with itself is zero).
    pub identical: Vec<usize>,
}

/// Tokenizes one preference example (module docs). An example whose chosen or rejected side
/// has no completion token before truncation is an error, since DPO would compare nothing.
pub fn tokenize_preference(
    tok: &Tokenizer,
    example: &Example,
    max_length: usize,
    index: usize,
) -> Result<PrefPair> {
    let Example::Preference {
        prompt,
        chosen,
        rejected,
    } = example
    else {
        return Err(DataError::Example {
            index,
            reason: "DPO needs preference rows (`prompt`, `chosen`, `rejected`)".into(),
        });
    };
    let tok_err = |source| DataError::Tokenize { index, source };
    let (prompt_ids, pc, pr) = match (prompt, chosen, rejected) {
        (Segment::Text(p), Segment::Text(c), Segment::Text(r)) => {
            let with_eos = |s: &str| match tok.eos_token() {
                Some(eos) if !s.ends_with(eos) => format!("{s}{eos}"),
                _ => s.to_string(),
            };
            let enc = |s: &str| tok.encode(s, true).map_err(tok_err);
            (
                enc(p)?,
                enc(&format!("{p}{}", with_eos(c)))?,
                enc(&format!("{p}{}", with_eos(r)))?,
            )
        }
        (Segment::Chat(p), Segment::Chat(c), Segment::Chat(r)) => {
            let joined = |c: &[Message]| -> Result<Vec<u32>> {
                let mut m = p.clone();
                m.extend_from_slice(c);
                Ok(tok.render(&m, false).map_err(tok_err)?.ids)
            };
            (
                tok.render(p, true).map_err(tok_err)?.ids,
                joined(c)?,
                joined(r)?,
            )
        }
        _ => {
            return Err(DataError::Example {
                index,
                reason: "`prompt`, `chosen` and `rejected` must all be text or all be message \
                         lists"
                    .into(),
            })
        }
    };
    let common = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let prompt_len = common(&prompt_ids, &pc).min(common(&prompt_ids, &pr));
    let side = |ids: Vec<u32>, name: &str| -> Result<Tokenized> {
        if ids.len() <= prompt_len {
            return Err(DataError::Example {
                index,
                reason: format!("`{name}` adds no token after the prompt"),
            });
        }
        let full = ids.len();
        let mut loss_mask = vec![0u8; prompt_len];
        loss_mask.resize(full, 1);
        let mut ids = ids;
        ids.truncate(max_length);
        loss_mask.truncate(max_length);
        Ok(Tokenized {
            truncated: full > ids.len(),
            tokens_dropped: full - ids.len(),
            ids,
            loss_mask,
        })
    };
    Ok(PrefPair {
        chosen: side(pc, "chosen")?,
        rejected: side(pr, "rejected")?,
    })
}

/// Tokenizes every example; pairs where truncation left a side without a completion token are
/// dropped (and counted), like SFT's examples with no trained token.
pub fn tokenize_preferences_all(
    tok: &Tokenizer,
    examples: &[Example],
    max_length: usize,
) -> Result<PrefSet> {
    if max_length < 2 {
        return Err(DataError::InvalidOption(
            "max_length must be at least 2 (a prompt token and a completion token)".into(),
        ));
    }
    let mut set = PrefSet::default();
    for (index, example) in examples.iter().enumerate() {
        let p = tokenize_preference(tok, example, max_length, index)?;
        set.truncated += usize::from(p.chosen.truncated || p.rejected.truncated);
        if !p.chosen.has_loss() || !p.rejected.has_loss() {
            set.dropped += 1;
            continue;
        }
        if p.chosen.ids == p.rejected.ids {
            set.identical.push(index);
        }
        set.items.push(p);
        set.source.push(index);
    }
    Ok(set)
}
