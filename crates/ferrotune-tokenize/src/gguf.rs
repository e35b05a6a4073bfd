//! Building our `Tokenizer` from GGUF metadata (llama.cpp's `tokenizer.ggml.*` keys), so that it
//! gives the same ids as transformers' `AutoTokenizer.from_pretrained(dir, gguf_file=...)`. It
//! owns the mapping from metadata to a `tokenizers` pipeline; it does not read tensors or files
//! (the caller parses the GGUF header with candle).
//!
//! What transformers builds for `tokenizer.ggml.model = "gpt2"` (read from its
//! `integrations/gguf/gguf_tokenizer_mapping.py` and `GPT2Tokenizer`), and we reproduce:
//! - model: BPE over the file's tokens and merges, no unk token, no dropout, no byte fallback;
//!   a token written outside the byte-level alphabet is respelled byte by byte into it;
//! - pre-tokenizer: `ByteLevel(add_prefix_space=false)` with GPT-2's split regex, or, when
//!   `tokenizer.ggml.pre` names a known family (llama3, qwen2, …), that family's split regex
//!   (`Split`, isolated) followed by `ByteLevel` without regex; `add_space_prefix` is ignored;
//! - decoder: `ByteLevel`;
//! - added tokens: CONTROL tokens (type 3) as special tokens (skipped when spelled outside the
//!   byte alphabet: a llama.cpp mislabel), USER_DEFINED tokens (type 4) as plain added tokens;
//! - post-processor: `[bos] $A [eos]` from `tokenizer.ggml.add_bos_token` / `add_eos_token`;
//! - special tokens: the strings at the bos/eos/unknown/padding ids; chat template from
//!   `tokenizer.chat_template`.
//!
//! For `tokenizer.ggml.model = "llama"` (sentencepiece BPE), as transformers' `LlamaTokenizer`:
//! - model: BPE with `byte_fallback` and `fuse_unk`, no unk token; merges from the file, or, as
//!   llama.cpp files carry none, derived from the vocabulary and the token scores (every split of
//!   a token into two vocabulary tokens, best score first — transformers' `generate_merges`);
//! - pre-tokenizer: `Metaspace("▁", prepend_scheme = "first", split = false)`; no normalizer;
//! - decoder: `Replace("▁", " ")`, `ByteFallback`, `Fuse`, `Strip(" ", 1, 0)`;
//! - `add_bos_token` defaults to true when the file does not say.
//!
//! For `"llama"` with `general.architecture` gemma, gemma2 or gemma3, as transformers'
//! `gemma_tokenizer` and `GemmaTokenizer`:
//! - vocabulary: a token made only of whitespace that holds a space (llama.cpp stores Gemma's
//!   `▁▁`… as real spaces) is respelled as that many `▁`; the added-token rules look at the
//!   file's spelling, which is no longer in the vocabulary, so those tokens (USER_DEFINED) are
//!   reached through BPE rather than matched whole;
//! - model: BPE with `byte_fallback`, `fuse_unk` and unk token `<unk>`; merges from the file, or
//!   derived as above with each token's position in the file (earlier first) as its score, since
//!   Gemma's scores do not follow its merge order;
//! - normalizer: `Replace(" ", "▁")`; pre-tokenizer: `Split(" ", merged_with_previous)` (a no-op
//!   after the normalizer, kept as built); no prefix `▁` (`add_space_prefix` is ignored);
//! - decoder: `Replace("▁", " ")`, `ByteFallback`, `Fuse` (no `Strip`);
//! - `<mask>` registered as a special token besides the file's bos/eos/unk/pad (GemmaTokenizer's
//!   default mask token; appended to the vocabulary when the file lacks it).
//!
//! For both sentencepiece kinds, added tokens, post-processor, special tokens and chat template
//! follow the byte-level rules above, without the byte-alphabet check, and a `tokenizer.ggml.pre`
//! naming a known family replaces the pre-tokenizer in the same way.
//!
//! Refused with `UnsupportedTokenizerModel`: unigram (`"t5"`) vocabularies, `"gemma4"`, and the
//! Phi-3 architecture, which transformers rebuilds with a prefix-`▁` normalizer and no
//! pre-tokenizer.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Result, TokenizeError};
use crate::hf_files::SpecialConfig;
use crate::tokenizer::{Tokenizer, DEFAULT_TEMPLATE};

/// llama.cpp token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// GemmaTokenizer's defaults for its BPE model's unk token and its mask token. transformers' GGUF
/// path passes neither to it, so they hold for every Gemma file, whatever its unknown token.
const GEMMA_UNK_TOKEN: &str = "<unk>";
const GEMMA_MASK_TOKEN: &str = "<mask>";

/// Split regexes of the pre-tokenizer families transformers knows by `tokenizer.ggml.pre`.
/// These are facts about how each vocabulary was trained, needed for identical ids.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split_regex_for(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's metadata (see the module docs).
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = &content.metadata;
        let model = get_str(md, "tokenizer.ggml.model")?;
        let architecture = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("");
        let builder = Builder::select(model, architecture)?;
        let byte_level = builder == Builder::ByteLevel;
        let tokens = get_str_array(md, "tokenizer.ggml.tokens")?;
        let token_types = match md.get("tokenizer.ggml.token_type") {
            Some(v) => Some(int_array(v, "tokenizer.ggml.token_type")?),
            None => None,
        };
        if let Some(types) = &token_types {
            if types.len() != tokens.len() {
                return Err(gguf_err(
                    "tokenizer.ggml.token_type",
                    format!("has {} entries for {} tokens", types.len(), tokens.len()),
                ));
            }
        }

        let alphabet = byte_alphabet();
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        let mut inner = match builder {
            Builder::ByteLevel => byte_level_tokenizer(md, &tokens, &alphabet)?,
            Builder::Llama => llama_tokenizer(md, &tokens)?,
            Builder::Gemma => gemma_tokenizer(md, &tokens)?,
        };

        // transformers replaces the pre-tokenizer of either kind when `tokenizer.ggml.pre` names
        // a family whose split regex it knows.
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("");
        if let Some(regex) = split_regex_for(pre) {
            let split = Split::new(
                SplitPattern::Regex(regex.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| TokenizeError::tokenizers(format!("split regex for `{pre}`"), &e))?;
            let sequence: PreTokenizerWrapper = Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into();
            inner.with_pre_tokenizer(Some(sequence));
        }

        if let Some(types) = &token_types {
            let control: Vec<AddedToken> = tokens
                .iter()
                .zip(types)
                .filter(|(t, ty)| **ty == TOKEN_TYPE_CONTROL && (!byte_level || in_alphabet(t)))
                .map(|(t, _)| AddedToken::from(t.clone(), true))
                .collect();
            if !control.is_empty() {
                inner.add_special_tokens(&control);
            }
            let user: Vec<AddedToken> = tokens
                .iter()
                .zip(types)
                .filter(|(t, ty)| **ty == TOKEN_TYPE_USER_DEFINED && inner.token_to_id(t).is_some())
                .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
                .collect();
            if !user.is_empty() {
                inner.add_tokens(&user);
            }
        }

        let token_at = |key: &str| -> Result<Option<String>> {
            match md.get(key) {
                None => Ok(None),
                Some(v) => {
                    let id = int_value(v, key)?;
                    let token = usize::try_from(id).ok().and_then(|i| tokens.get(i));
                    match token {
                        Some(t) => Ok(Some(t.clone())),
                        None => Err(gguf_err(
                            key,
                            format!("id {id} is outside the vocabulary of {}", tokens.len()),
                        )),
                    }
                }
            }
        };
        let special = SpecialConfig {
            bos_token: token_at("tokenizer.ggml.bos_token_id")?,
            eos_token: token_at("tokenizer.ggml.eos_token_id")?,
            unk_token: token_at("tokenizer.ggml.unknown_token_id")?,
            pad_token: token_at("tokenizer.ggml.padding_token_id")?,
            // llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
            add_bos_token: get_bool_opt(md, "tokenizer.ggml.add_bos_token")?
                .or((!byte_level).then_some(true)),
            add_eos_token: get_bool_opt(md, "tokenizer.ggml.add_eos_token")?,
        };

        // llama.cpp's end-of-turn / end-of-message ids play the role of generation_config's
        // extra eos ids; they change no encoding.
        let mut extra_eos = Vec::new();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(v) = md.get(key) {
                let id = int_value(v, key)?;
                let id = u32::try_from(id).map_err(|_| gguf_err(key, "is not a token id"))?;
                extra_eos.push(id);
            }
        }

        let templates = match md.get("tokenizer.chat_template") {
            Some(v) => vec![(
                DEFAULT_TEMPLATE.to_string(),
                v.to_string()
                    .map_err(|_| gguf_err("tokenizer.chat_template", "is not a string"))?
                    .clone(),
            )],
            None => Vec::new(),
        };

        let mut tok = Tokenizer::assemble(
            inner,
            special,
            templates,
            extra_eos,
            "GGUF metadata".to_string(),
        )?;
        // GemmaTokenizer also names a mask token, registered after bos/eos/unk/pad (the order
        // transformers walks its special tokens in, which sets the id of any that are new).
        if builder == Builder::Gemma {
            let mask = GEMMA_MASK_TOKEN.to_string();
            let added = tok.inner.get_added_tokens_decoder();
            if !added.values().any(|t| t.content == mask) {
                tok.inner
                    .add_special_tokens(&[AddedToken::from(mask, true)]);
            }
        }
        Ok(tok)
    }
}

/// The `tokenizers` pipeline a GGUF describes, picked as transformers'
/// `select_tokenizer_builder` picks it: by `tokenizer.ggml.model`, and for a sentencepiece
/// vocabulary by `general.architecture`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Builder {
    /// `"gpt2"`: byte-level BPE (`GPT2Tokenizer`).
    ByteLevel,
    /// `"llama"`: sentencepiece BPE (`LlamaTokenizer`).
    Llama,
    /// `"llama"` for a Gemma architecture (`gemma_tokenizer` → `GemmaTokenizer`).
    Gemma,
}

impl Builder {
    fn select(model: &str, architecture: &str) -> Result<Self> {
        match (model, architecture) {
            ("gpt2", _) => Ok(Self::ByteLevel),
            ("llama", "gemma" | "gemma2" | "gemma3") => Ok(Self::Gemma),
            ("llama", "phi3") => Err(TokenizeError::UnsupportedTokenizerModel {
                model: format!("llama (sentencepiece) for architecture `{architecture}`"),
            }),
            ("llama", _) => Ok(Self::Llama),
            (other, _) => Err(TokenizeError::UnsupportedTokenizerModel {
                model: other.to_string(),
            }),
        }
    }
}

/// Byte-level BPE (GPT-2 style) from the file's tokens and merges.
fn byte_level_tokenizer(
    md: &HashMap<String, Value>,
    tokens: &[String],
    alphabet: &[char],
) -> Result<tokenizers::Tokenizer> {
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        let spelled = if in_alphabet(token) {
            token.clone()
        } else {
            token.bytes().map(|b| alphabet[b as usize]).collect()
        };
        // Duplicate spellings: the later id wins, as in transformers' dict comprehension.
        vocab.insert(spelled, id as u32);
    }
    if !md.contains_key("tokenizer.ggml.merges") {
        return Err(gguf_err(
            "tokenizer.ggml.merges",
            "missing; a byte-level BPE GGUF without merges is not supported",
        ));
    }
    let merges = file_merges(md)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| TokenizeError::tokenizers("building BPE from GGUF vocab/merges", &e))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(inner)
}

/// Sentencepiece BPE (Llama 2 / Mistral style) with byte fallback.
fn llama_tokenizer(
    md: &HashMap<String, Value>,
    tokens: &[String],
) -> Result<tokenizers::Tokenizer> {
    let bpe = sentencepiece_bpe(md, tokens.to_vec(), None, || file_scores(md, tokens.len()))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
    inner.with_decoder(Some(sentencepiece_decoder(true)?));
    Ok(inner)
}

/// Gemma's sentencepiece BPE: spaces respelled, merges by file position, spaces → `▁` in a
/// normalizer rather than a `Metaspace` pre-tokenizer, and no prefix `▁`.
fn gemma_tokenizer(
    md: &HashMap<String, Value>,
    tokens: &[String],
) -> Result<tokenizers::Tokenizer> {
    let respelled: Vec<String> = tokens.iter().map(|t| gemma_spelling(t)).collect();
    // Earlier in the file is merged first; -position keeps "higher score first" meaning that.
    let positions = || Ok((0..tokens.len()).map(|i| -(i as f64)).collect());
    let bpe = sentencepiece_bpe(md, respelled, Some(GEMMA_UNK_TOKEN), positions)?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let to_metaspace =
        Replace::new(" ", "▁").map_err(|e| TokenizeError::tokenizers("Gemma normalizer", &e))?;
    inner.with_normalizer(Some(to_metaspace));
    let split = Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false)
        .map_err(|e| TokenizeError::tokenizers("Gemma pre-tokenizer", &e))?;
    inner.with_pre_tokenizer(Some(split));
    inner.with_decoder(Some(sentencepiece_decoder(false)?));
    Ok(inner)
}

/// How transformers' `gemma_tokenizer` spells a token: one made only of whitespace that holds a
/// space becomes that many `▁` (counted in characters, as Python's `len`).
fn gemma_spelling(token: &str) -> String {
    // Python's `str.isspace`, which `not t.strip()` tests: Unicode White_Space plus the four
    // information separators U+001C..U+001F.
    let python_space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    if token.contains(' ') && token.chars().all(python_space) {
        "▁".repeat(token.chars().count())
    } else {
        token.to_string()
    }
}

/// The sentencepiece BPE model: `fuse_unk`, `byte_fallback`, merges from the file or derived
/// from the vocabulary with the scores `scores` gives (asked for only when the file has none).
fn sentencepiece_bpe(
    md: &HashMap<String, Value>,
    tokens: Vec<String>,
    unk_token: Option<&str>,
    scores: impl FnOnce() -> Result<Vec<f64>>,
) -> Result<BPE> {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert(token.clone(), id as u32);
    }
    let merges = if md.contains_key("tokenizer.ggml.merges") {
        file_merges(md)?
    } else {
        merges_from_scores(&tokens, &scores()?, &vocab)
    };
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true);
    if let Some(unk) = unk_token {
        builder = builder.unk_token(unk.to_string());
    }
    builder
        .build()
        .map_err(|e| TokenizeError::tokenizers("building sentencepiece BPE from GGUF", &e))
}

/// `tokenizer.ggml.scores`, one float per token.
fn file_scores(md: &HashMap<String, Value>, n_tokens: usize) -> Result<Vec<f64>> {
    let scores = match md.get("tokenizer.ggml.scores") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::F32(x) => Ok(f64::from(*x)),
                Value::F64(x) => Ok(*x),
                _ => Err(gguf_err("tokenizer.ggml.scores", "holds a non-float entry")),
            })
            .collect::<Result<Vec<f64>>>()?,
        Some(_) => return Err(gguf_err("tokenizer.ggml.scores", "is not an array")),
        None => {
            return Err(gguf_err(
                "tokenizer.ggml.scores",
                "missing, and no merges: cannot derive the BPE merges",
            ))
        }
    };
    if scores.len() != n_tokens {
        return Err(gguf_err(
            "tokenizer.ggml.scores",
            format!("has {} entries for {n_tokens} tokens", scores.len()),
        ));
    }
    Ok(scores)
}

/// `Replace("▁", " ")`, `ByteFallback`, `Fuse`, then with `strip_prefix` `Strip(" ", 1, 0)` (the
/// space a `Metaspace` prefix put in front).
fn sentencepiece_decoder(strip_prefix: bool) -> Result<DecoderWrapper> {
    let replace = Replace::new("▁", " ")
        .map_err(|e| TokenizeError::tokenizers("sentencepiece decoder", &e))?;
    let mut steps = vec![
        DecoderWrapper::Replace(replace),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if strip_prefix {
        steps.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    Ok(DecoderSequence::new(steps).into())
}

/// `tokenizer.ggml.merges` as pairs: each entry is two tokens separated by one space.
fn file_merges(md: &HashMap<String, Value>) -> Result<Vec<(String, String)>> {
    let merges = get_str_array(md, "tokenizer.ggml.merges")?;
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, merge) in merges.iter().enumerate() {
        match merge.split_once(' ') {
            Some((a, b)) if !b.contains(' ') => pairs.push((a.to_string(), b.to_string())),
            _ => {
                return Err(gguf_err(
                    "tokenizer.ggml.merges",
                    format!("entry {i} {merge:?} is not two tokens separated by one space"),
                ))
            }
        }
    }
    Ok(pairs)
}

/// Merges implied by a scored vocabulary (transformers' `generate_merges` with scores): every
/// split of a token into two vocabulary tokens, ordered best score first, then longer left and
/// right pieces first; ties keep vocabulary order (splits of one token by the pieces' ids).
fn merges_from_scores(tokens: &[String], scores: &[f64], vocab: &Vocab) -> Vec<(String, String)> {
    /// One split, with its sort key computed once (a 262k vocabulary has ~500k of them).
    struct Candidate<'a> {
        token: &'a str,
        at: usize,
        score: f64,
        chars_l: usize,
        chars_r: usize,
        ids: (u32, u32),
    }
    // A token listed twice keeps its first position and its last score (Python dict semantics).
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    for (token, &score) in tokens.iter().zip(scores) {
        // Python compares -0.0 equal to 0.0, `total_cmp` would not.
        let score = if score == 0.0 { 0.0 } else { score };
        if score_of.insert(token.as_str(), score).is_none() {
            order.push(token.as_str());
        }
    }
    let mut merges: Vec<Candidate> = Vec::new();
    for token in order {
        let score = score_of[token];
        let chars = token.chars().count();
        let first = merges.len();
        for (chars_l, (at, _)) in token.char_indices().enumerate().skip(1) {
            let (l, r) = token.split_at(at);
            if let (Some(&id_l), Some(&id_r)) = (vocab.get(l), vocab.get(r)) {
                merges.push(Candidate {
                    token,
                    at,
                    score,
                    chars_l,
                    chars_r: chars - chars_l,
                    ids: (id_l, id_r),
                });
            }
        }
        merges[first..].sort_by_key(|m| m.ids);
    }
    // Stable sort, descending key: equal keys keep their order, as Python's sorted(reverse=True).
    merges.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.chars_l.cmp(&a.chars_l))
            .then(b.chars_r.cmp(&a.chars_r))
    });
    merges
        .into_iter()
        .map(|m| {
            let (l, r) = m.token.split_at(m.at);
            (l.to_string(), r.to_string())
        })
        .collect()
}

/// GPT-2's byte → printable-character table: bytes that are printable Latin-1 map to
/// themselves, the others to U+0100 onwards in byte order.
fn byte_alphabet() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                let c = char::from_u32(next).unwrap_or('?');
                next += 1;
                c
            }
        })
        .collect()
}

fn gguf_err(key: &str, reason: impl Into<String>) -> TokenizeError {
    TokenizeError::Gguf {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn get_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a str> {
    match md.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(gguf_err(key, "is not a string")),
        None => Err(gguf_err(key, "missing")),
    }
}

fn get_str_array(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    match md.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(gguf_err(key, format!("entry {i} is not a string"))),
            })
            .collect(),
        Some(_) => Err(gguf_err(key, "is not an array")),
        None => Err(gguf_err(key, "missing")),
    }
}

fn get_bool_opt(md: &HashMap<String, Value>, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(gguf_err(key, "is not a boolean")),
    }
}

/// Any GGUF integer type as i64 (files differ in which width they use for ids and types).
fn int_value(v: &Value, key: &str) -> Result<i64> {
    Ok(match v {
        Value::U8(x) => i64::from(*x),
        Value::I8(x) => i64::from(*x),
        Value::U16(x) => i64::from(*x),
        Value::I16(x) => i64::from(*x),
        Value::U32(x) => i64::from(*x),
        Value::I32(x) => i64::from(*x),
        Value::U64(x) => i64::try_from(*x).map_err(|_| gguf_err(key, "integer too large"))?,
        Value::I64(x) => *x,
        _ => return Err(gguf_err(key, "is not an integer")),
    })
}

fn int_array(v: &Value, key: &str) -> Result<Vec<i64>> {
    match v {
        Value::Array(items) => items.iter().map(|x| int_value(x, key)).collect(),
        _ => Err(gguf_err(key, "is not an array")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_a_bijection_with_gpt2_spellings() {
        let a = byte_alphabet();
        assert_eq!(a.len(), 256);
        // GPT-2 spells space as 'Ġ' (U+0120) and newline as 'Ċ' (U+010A).
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[b'A' as usize], 'A');
        let mut sorted = a.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }

    fn content_with(pairs: &[(&str, &str)]) -> Content {
        let metadata = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn unsupported_models_are_refused_by_name() {
        let err =
            Tokenizer::from_gguf(&content_with(&[("tokenizer.ggml.model", "t5")])).unwrap_err();
        assert!(
            matches!(err, TokenizeError::UnsupportedTokenizerModel { ref model } if model == "t5")
        );
        assert!(
            err.to_string().contains("unsupported tokenizer model `t5`"),
            "{err}"
        );
        let err = Tokenizer::from_gguf(&content_with(&[
            ("tokenizer.ggml.model", "llama"),
            ("general.architecture", "phi3"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("phi3"), "{err}");
    }

    /// Asserts the merges `merges_from_scores` derives for the vocabulary a, b, c, ab, bc, abc.
    fn assert_merges(scores: &[f64], want: &[(&str, &str)]) {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges_from_scores(&tokens, scores, &vocab);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        assert_eq!(pairs, want);
    }

    #[test]
    fn merges_from_scores_follow_score_then_length_order() {
        // Expected: transformers.tokenization_utils_base.generate_merges on the same vocabulary
        // and scores returns [('b','c'), ('a','b'), ('ab','c'), ('a','bc')].
        assert_merges(
            &[0.0, 0.0, 0.0, -1.0, -0.5, -2.0],
            &[("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")],
        );
    }

    #[test]
    fn merges_from_scores_treat_negative_zero_as_zero() {
        // Expected: generate_merges with scores [0, 0, 0, -0.0, 0.0, -1] returns
        // [('a','b'), ('b','c'), ('ab','c'), ('a','bc')]: Python's -0.0 == 0.0 keeps vocabulary
        // order, where `total_cmp` put ('b','c') first.
        assert_merges(
            &[0.0, 0.0, 0.0, -0.0, 0.0, -1.0],
            &[("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")],
        );
    }
}
