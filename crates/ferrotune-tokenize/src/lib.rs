//! The `tokenize` room of ferrotune: text ↔ token ids and chat templates. It owns loading a
//! tokenizer (Hugging Face `tokenizer.json` folder or GGUF metadata), rendering conversations with
//! the model's Jinja chat template exactly as transformers' `apply_chat_template` does, and the
//! assistant mask that says which tokens a trainer scores. It does not touch tensors, read
//! datasets or know about models.
//!
//! ```no_run
//! use ferrotune_tokenize::{Message, Tokenizer};
//! # fn main() -> Result<(), ferrotune_tokenize::TokenizeError> {
//! let tok = Tokenizer::from_dir(std::path::Path::new("models/SmolLM2-135M-Instruct"))?;
//! let r = tok.render(&[Message::user("2+2?"), Message::assistant("4")], false)?;
//! assert_eq!(r.ids.len(), r.assistant_mask.len());
//! # Ok(()) }
//! ```

mod chat;
mod error;
mod gguf;
mod hf_files;
mod python;
mod tokenizer;
pub mod tools;
pub mod train;

pub use chat::{mask_from_spans, ChatTemplate, Message, Rendered, TemplateTokens};
pub use error::{Result, TokenizeError};
pub use python::strftime_utc;
pub use tokenizer::{ByteSpan, Tokenizer, DEFAULT_TEMPLATE, TOOL_USE_TEMPLATE};
