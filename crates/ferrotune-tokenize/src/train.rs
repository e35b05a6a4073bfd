//! Training a byte-level BPE tokenizer from text (the `tokenizers` crate's `BpeTrainer`) and
//! writing it as a Hugging Face folder: `tokenizer.json` plus a `tokenizer_config.json` with the
//! special tokens and a ChatML chat template. Used by `ferrotune pretrain`.
//!
//! Owns: the pipeline choice (digits split one by one, then GPT-2 byte-level pre-tokenization,
//! byte-level decoding, as SmolLM2 does), the fixed special tokens and the config file's fields.
//! Does not own: where the corpus comes from, or loading (`Tokenizer::from_dir` reads the result).
//!
//! Special tokens are cut out of the training texts before pair counting: the trainer counts
//! every split, including added tokens, so chat text would otherwise spend merges on `<|`, `im`
//! and `|>` that can never be used (the special tokens are matched whole when encoding).

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, TokenizerImpl};

use crate::error::{Result, TokenizeError};
use crate::tokenizer::Tokenizer;

/// Separates documents in a pretraining stream; also the BOS token (never added automatically).
pub const ENDOFTEXT: &str = "<|endoftext|>";
/// Opens a chat turn: `<|im_start|>role\n`.
pub const IM_START: &str = "<|im_start|>";
/// Closes a chat turn; the EOS token, so generation stops at the end of a reply.
pub const IM_END: &str = "<|im_end|>";
/// Padding only; never trained on.
pub const PAD: &str = "<|pad|>";

/// The special tokens, in id order (ids 0..4).
pub const SPECIAL_TOKENS: [&str; 4] = [ENDOFTEXT, IM_START, IM_END, PAD];

/// ChatML as SmolLM2-Instruct writes it, without its default system message (a tiny context
/// cannot spare the tokens): `<|im_start|>role\ncontent<|im_end|>\n` per message, and
/// `<|im_start|>assistant\n` with `add_generation_prompt`.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Settings of a BPE training run.
#[derive(Debug, Clone, PartialEq)]
pub struct BpeTrainOptions {
    /// Final vocabulary size, special tokens and the 256 byte symbols included.
    pub vocab_size: usize,
    /// A pair must occur at least this often to be merged.
    pub min_frequency: u64,
    /// Written as `model_max_length` in `tokenizer_config.json`.
    pub model_max_length: usize,
}

/// The texts as the trainer sees them: every special token cut out, empty pieces dropped.
pub fn strip_special_tokens<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out = Vec::new();
    for text in texts {
        let mut pieces = vec![text.to_string()];
        for special in SPECIAL_TOKENS {
            pieces = pieces
                .iter()
                .flat_map(|p| p.split(special).map(str::to_string).collect::<Vec<_>>())
                .collect();
        }
        out.extend(pieces.into_iter().filter(|p| !p.is_empty()));
    }
    out
}

/// Train a byte-level BPE tokenizer on `texts` (the `tokenizers` crate's model, unwrapped).
pub fn train_bpe<'a>(
    texts: impl IntoIterator<Item = &'a str>,
    opts: &BpeTrainOptions,
) -> Result<tokenizers::Tokenizer> {
    let min_vocab = 256 + SPECIAL_TOKENS.len();
    if opts.vocab_size < min_vocab {
        return Err(TokenizeError::Tokenizers {
            context: "training a BPE tokenizer".into(),
            message: format!(
                "vocab_size {} is below {min_vocab} (256 byte symbols + {} special tokens)",
                opts.vocab_size,
                SPECIAL_TOKENS.len()
            ),
        });
    }
    let pieces = strip_special_tokens(texts);
    let mut tok: TokenizerImpl<
        BPE,
        tokenizers::NormalizerWrapper,
        PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    > = TokenizerImpl::new(BPE::default());
    // Digits one by one (so "127" is always 1, 2, 7 and arithmetic sees aligned digits), then
    // GPT-2's byte-level split with its regex; no prefix space, as SmolLM2.
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]);
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(pre)));
    tok.with_decoder(Some(tokenizers::DecoderWrapper::ByteLevel(
        ByteLevelDecoder::default(),
    )));
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(opts.vocab_size)
        .min_frequency(opts.min_frequency)
        .special_tokens(specials)
        .initial_alphabet(alphabet)
        .show_progress(false)
        .build();
    tok.train(&mut trainer, pieces.iter())
        .map_err(|e| TokenizeError::tokenizers("training a BPE tokenizer", &e))?;
    Ok(tokenizers::Tokenizer::from(tok))
}

/// `tokenizer_config.json` for a tokenizer made by [`train_bpe`], as transformers writes one.
pub fn tokenizer_config_json(
    tok: &tokenizers::Tokenizer,
    model_max_length: usize,
) -> serde_json::Value {
    let mut decoder = serde_json::Map::new();
    for special in SPECIAL_TOKENS {
        if let Some(id) = tok.token_to_id(special) {
            decoder.insert(
                id.to_string(),
                serde_json::json!({
                    "content": special,
                    "lstrip": false,
                    "normalized": false,
                    "rstrip": false,
                    "single_word": false,
                    "special": true,
                }),
            );
        }
    }
    serde_json::json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": ENDOFTEXT,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": IM_END,
        "model_max_length": model_max_length,
        "pad_token": PAD,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": null,
    })
}

/// Train on `texts` and write `tokenizer.json` and `tokenizer_config.json` into `dir` (which
/// must exist); returns the tokenizer as `Tokenizer::from_dir` loads it back.
pub fn train_tokenizer<'a>(
    texts: impl IntoIterator<Item = &'a str>,
    opts: &BpeTrainOptions,
    dir: &Path,
) -> Result<Tokenizer> {
    let tok = train_bpe(texts, opts)?;
    let tokenizer_path = dir.join("tokenizer.json");
    tok.save(&tokenizer_path, false).map_err(|e| {
        TokenizeError::tokenizers(format!("writing {}", tokenizer_path.display()), &e)
    })?;
    let config_path = dir.join("tokenizer_config.json");
    let config = tokenizer_config_json(&tok, opts.model_max_length);
    let text = serde_json::to_string_pretty(&config).map_err(|source| TokenizeError::Json {
        path: config_path.clone(),
        source,
    })?;
    fs::write(&config_path, text).map_err(|source| TokenizeError::Io {
        path: config_path.clone(),
        source,
    })?;
    Tokenizer::from_dir(dir)
}
