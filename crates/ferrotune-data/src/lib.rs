//! The `data` room of ferrotune: dataset files (JSONL, Parquet, CSV) → rows → typed examples with
//! TRL's column conventions → SFT token ids and loss masks → train/eval split, seeded per-epoch
//! order with a resumable cursor → optional packing → right-padded batches as plain `Vec`s. It
//! does not know models, losses or tensors; tokenization and chat templates are
//! `ferrotune-tokenize`'s.
//!
//! ```no_run
//! use std::path::Path;
//! use ferrotune_data::*;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tok = ferrotune_tokenize::Tokenizer::from_dir(Path::new("models/SmolLM2-135M-Instruct"))?;
//! let path = Path::new("train.jsonl");
//! let examples = sft_examples(&read_rows(path)?, path)?;
//! let set = tokenize_sft_all(&tok, &examples, 512, &SftOptions::default(), true)?;
//! let mut loader = Loader::new(set.items.len(), Shuffler::new(42, true))?;
//! let idx = loader.next_batch(8)?;
//! let batch: Vec<&Tokenized> = idx.iter().map(|&i| &set.items[i]).collect();
//! let collated = collate_right(&batch, tok.pad_id().unwrap_or(0));
//! # let _ = collated; Ok(()) }
//! ```

mod collate;
mod error;
mod example;
mod fingerprint;
mod order;
mod pack;
mod pref;
mod read;
mod sft;
mod synth;

pub use collate::{collate_right, Collated, Sequence};
pub use error::{DataError, Result};
pub use example::{
    detect_sft_format, preference_examples, prompt_examples, sft_examples, Example, Segment,
    SftFormat,
};
pub use fingerprint::{tokenized_fingerprint, Fingerprint};
pub use order::{split, split_items, Cursor, EvalSize, Loader, Shuffler, Split};
pub use pack::{pack, Packed};
pub use pref::{tokenize_preference, tokenize_preferences_all, PrefPair, PrefSet};
pub use read::{read_rows, FileFormat, Row};
pub use sft::{
    tokenize_sft, tokenize_sft_all, SftOptions, Tokenized, TokenizedSet, TruncationStats,
};
pub use synth::{
    arithmetic, arithmetic_excluding, arithmetic_space, parse_digits, parse_ops, preference_pairs,
    prompt_set, tagged_reply, word_problems, word_problems_excluding, word_space, write_jsonl,
    write_preference_jsonl, write_sft_conversations, write_tool_transcripts, ArithmeticSpec, Op,
    PreferencePair, Problem, PromptFormat, RejectedKind, SynthError, SynthResult, WordSpec,
    WordTemplate, MAX_DIGITS, WORD_TEMPLATES,
};
