//! SFT tokenization: an `Example` → token ids and a loss mask of the same length, truncated to
//! `max_seq_len`, plus the counts a trainer logs (how many were truncated, how many tokens were
//! dropped, how many lost every trained token). The ids and the mask always come from one call
//! into the tokenizer's render functions, so they cannot disagree. It owns no template logic
//! (`ferrotune-tokenize`) and no batching (`collate.rs`, `pack.rs`).
//!
//! What is trained on, by example type (TRL's rules):
//! - `Text`: every token; EOS is appended when the text does not already end with it, so the
//!   model learns to stop.
//! - `PromptCompletion`: the completion only (`completion_only_loss`, default true). Plain text
//!   gets EOS appended by `Tokenizer::render_prompt_completion`; chat completions end with the
//!   template's own end-of-turn token.
//! - `Messages`: the assistant turns only (`assistant_only_loss`). Our default is true, where
//!   TRL's is false: training on user turns teaches the model to write them.

use ferrotune_tokenize::{Rendered, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::example::{Example, Segment};

/// Which tokens SFT trains on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftOptions {
    /// Prompt/completion examples: loss on the completion only (else on every token).
    pub completion_only_loss: bool,
    /// Conversations: loss on assistant turns only (else on every token).
    pub assistant_only_loss: bool,
}

impl Default for SftOptions {
    fn default() -> Self {
        SftOptions {
            completion_only_loss: true,
            assistant_only_loss: true,
        }
    }
}

/// One tokenized example. `loss_mask[i] == 1` when token `i` is a training target (the trainer
/// predicts it from the tokens before it).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
    /// Tokens were cut off the end to fit `max_seq_len`.
    pub truncated: bool,
    /// How many tokens were cut off.
    pub tokens_dropped: usize,
}

impl Tokenized {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of trained tokens.
    pub fn loss_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m != 0).count()
    }

    /// False when truncation (or a conversation without an assistant turn) left nothing to
    /// train on; such an example only costs compute.
    pub fn has_loss(&self) -> bool {
        self.loss_mask.iter().any(|&m| m != 0)
    }
}

/// Truncation counts over a dataset, for the run log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TruncationStats {
    /// Examples tokenized.
    pub examples: usize,
    /// Examples longer than `max_seq_len`.
    pub truncated: usize,
    /// Tokens cut off, summed over examples.
    pub tokens_dropped: usize,
    /// Examples with no trained token left (skipped by `tokenize_sft_all` when asked).
    pub no_loss: usize,
}

impl TruncationStats {
    pub fn record(&mut self, t: &Tokenized) {
        self.examples += 1;
        self.truncated += usize::from(t.truncated);
        self.tokens_dropped += t.tokens_dropped;
        self.no_loss += usize::from(!t.has_loss());
    }

    /// Fraction of examples truncated (0 for none).
    pub fn truncated_fraction(&self) -> f64 {
        if self.examples == 0 {
            0.0
        } else {
            self.truncated as f64 / self.examples as f64
        }
    }
}

/// Tokenizes one SFT example and truncates it to `max_seq_len` from the right (the end is cut, as
/// TRL's `truncation_mode = "keep_start"`).
pub fn tokenize_sft(
    tok: &Tokenizer,
    example: &Example,
    max_seq_len: usize,
    opts: &SftOptions,
) -> Result<Tokenized> {
    tokenize_sft_at(tok, example, max_seq_len, opts, 0)
}

fn tokenize_sft_at(
    tok: &Tokenizer,
    example: &Example,
    max_seq_len: usize,
    opts: &SftOptions,
    index: usize,
) -> Result<Tokenized> {
    if max_seq_len == 0 {
        return Err(DataError::InvalidOption(
            "max_seq_len must be at least 1".into(),
        ));
    }
    let tok_err = |source| DataError::Tokenize { index, source };
    let (ids, mut loss_mask) = match example {
        Example::Text { text } => {
            let mut ids = tok.encode(text, true).map_err(tok_err)?;
            if let Some(&eos) = tok.eos_ids().first() {
                if ids.last() != Some(&eos) {
                    ids.push(eos);
                }
            }
            let mask = vec![1u8; ids.len()];
            (ids, mask)
        }
        Example::PromptCompletion { prompt, completion } => {
            let Rendered {
                ids,
                assistant_mask,
                ..
            } = match (prompt, completion) {
                (Segment::Text(p), Segment::Text(c)) => tok.render_prompt_completion(p, c),
                (Segment::Chat(p), Segment::Chat(c)) => tok.render_chat_prompt_completion(p, c),
                _ => {
                    return Err(DataError::Example {
                        index,
                        reason: "`prompt` and `completion` must both be text or both be \
                                 message lists"
                            .into(),
                    })
                }
            }
            .map_err(tok_err)?;
            let mask = if opts.completion_only_loss {
                assistant_mask
            } else {
                vec![1; ids.len()]
            };
            (ids, mask)
        }
        Example::Messages { messages } => {
            let r = tok.render(messages, false).map_err(tok_err)?;
            let mask = if opts.assistant_only_loss {
                r.assistant_mask
            } else {
                vec![1; r.ids.len()]
            };
            (r.ids, mask)
        }
        Example::Preference { .. } | Example::Prompt { .. } => {
            return Err(DataError::Example {
                index,
                reason: "a preference or prompt-only example is not an SFT example".into(),
            })
        }
    };
    let mut ids = ids;
    let full = ids.len();
    ids.truncate(max_seq_len);
    loss_mask.truncate(max_seq_len);
    Ok(Tokenized {
        truncated: full > ids.len(),
        tokens_dropped: full - ids.len(),
        ids,
        loss_mask,
    })
}

/// A tokenized dataset: `items[k]` came from `examples[source[k]]`.
#[derive(Clone, Debug, Default)]
pub struct TokenizedSet {
    pub items: Vec<Tokenized>,
    pub source: Vec<usize>,
    pub stats: TruncationStats,
}

/// Tokenizes every example, counting truncations; with `skip_no_loss` the examples left with no
/// trained token are dropped (they stay counted in `stats.no_loss`).
pub fn tokenize_sft_all(
    tok: &Tokenizer,
    examples: &[Example],
    max_seq_len: usize,
    opts: &SftOptions,
    skip_no_loss: bool,
) -> Result<TokenizedSet> {
    let mut set = TokenizedSet::default();
    for (index, example) in examples.iter().enumerate() {
        let t = tokenize_sft_at(tok, example, max_seq_len, opts, index)?;
        set.stats.record(&t);
        if skip_no_loss && !t.has_loss() {
            continue;
        }
        set.items.push(t);
        set.source.push(index);
    }
    Ok(set)
}
