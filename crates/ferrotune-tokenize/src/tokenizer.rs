//! Our `Tokenizer`: a `tokenizers::Tokenizer` plus what Hugging Face keeps beside it — the special
//! tokens of `tokenizer_config.json`, the end-of-turn ids of `generation_config.json` and the chat
//! templates — and the one function that turns a conversation into ids and a loss mask
//! (`render`). It owns putting a tokenizer together from a model folder (the side files' formats
//! are read in `hf_files.rs`); loading from GGUF metadata is in `gguf.rs`, template semantics in
//! `chat.rs`. It never touches tensors.

use std::fs;
use std::path::Path;

use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

use crate::chat::{mask_from_spans, ChatTemplate, Message, Rendered, TemplateTokens};
use crate::error::{Result, TokenizeError};
use crate::hf_files::{
    parse_config_templates, parse_eos_ids, parse_special_config, read_json_opt,
    read_template_files, SpecialConfig,
};

/// The template name transformers uses for a single template, and picks by default.
pub const DEFAULT_TEMPLATE: &str = "default";
/// The template transformers picks when tools are passed and the model has one by this name.
pub const TOOL_USE_TEMPLATE: &str = "tool_use";

/// A token's `(start, end)` byte range in the encoded text.
pub type ByteSpan = (usize, usize);

/// A tokenizer with its special tokens and chat templates.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    pub(crate) inner: tokenizers::Tokenizer,
    pub(crate) tokens: TemplateTokens,
    pub(crate) bos_id: Option<u32>,
    /// The config's eos and `generation_config.json`'s ids; see [`Tokenizer::eos_ids`].
    pub(crate) config_eos: Vec<u32>,
    /// `config_eos` plus the default template's end-of-turn token when it is another one.
    pub(crate) eos_ids: Vec<u32>,
    pub(crate) pad_id: Option<u32>,
    pub(crate) add_bos_token: bool,
    pub(crate) add_eos_token: bool,
    /// Named templates, `default` first when present.
    pub(crate) templates: Vec<ChatTemplate>,
    /// Where it was loaded from, for error messages.
    pub(crate) source_desc: String,
}

impl Tokenizer {
    /// Loads a Hugging Face model folder: `tokenizer.json` (required), `tokenizer_config.json`,
    /// `chat_template.jinja` / `chat_templates/*.jinja` and `generation_config.json` (optional).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let bytes = fs::read(&tokenizer_path).map_err(|source| TokenizeError::Io {
            path: tokenizer_path.clone(),
            source,
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            TokenizeError::tokenizers(format!("loading {}", tokenizer_path.display()), &e)
        })?;

        let config_path = dir.join("tokenizer_config.json");
        let (special, mut templates) = match read_json_opt(&config_path)? {
            Some(config) => (
                parse_special_config(&config, &config_path)?,
                parse_config_templates(&config, &config_path)?,
            ),
            None => (SpecialConfig::default(), Vec::new()),
        };
        // Template files take priority over the config's entry, as in transformers v5.
        let file_templates = read_template_files(dir)?;
        if !file_templates.is_empty() {
            templates = file_templates;
        }

        let gen_path = dir.join("generation_config.json");
        let extra_eos = match read_json_opt(&gen_path)? {
            Some(gen) => parse_eos_ids(gen.get("eos_token_id"), &gen_path)?,
            None => Vec::new(),
        };

        Self::assemble(
            inner,
            special,
            templates,
            extra_eos,
            dir.display().to_string(),
        )
    }

    /// Puts the parts together: registers the special tokens, applies transformers' BOS/EOS rule
    /// and resolves token strings to ids.
    pub(crate) fn assemble(
        mut inner: tokenizers::Tokenizer,
        special: SpecialConfig,
        templates: Vec<(String, String)>,
        extra_eos: Vec<u32>,
        source_desc: String,
    ) -> Result<Self> {
        // transformers registers every named special token as a special added token, so it is
        // matched whole in text and skipped by `decode(skip_special_tokens)`.
        let added: Vec<String> = inner
            .get_added_tokens_decoder()
            .values()
            .map(|t| t.content.clone())
            .collect();
        let missing: Vec<AddedToken> = [
            &special.bos_token,
            &special.eos_token,
            &special.unk_token,
            &special.pad_token,
        ]
        .into_iter()
        .flatten()
        .filter(|t| !added.contains(t))
        .map(|t| AddedToken::from(t.clone(), true))
        .collect();
        if !missing.is_empty() {
            inner.add_special_tokens(&missing);
        }

        let id_of = |token: &Option<String>, field: &str| -> Result<Option<u32>> {
            match token {
                None => Ok(None),
                Some(t) => {
                    inner
                        .token_to_id(t)
                        .map(Some)
                        .ok_or_else(|| TokenizeError::UnknownToken {
                            token: t.clone(),
                            context: format!("{field} of {source_desc}"),
                        })
                }
            }
        };
        let bos_id = id_of(&special.bos_token, "bos_token")?;
        let eos_id = id_of(&special.eos_token, "eos_token")?;
        let pad_id = id_of(&special.pad_token, "pad_token")?;

        // transformers rebuilds the post-processor as `[bos] $A [eos]` when the config states
        // add_bos_token/add_eos_token or when tokenizer.json has none; otherwise tokenizer.json's
        // own post-processor decides what `add_special_tokens=true` adds.
        let add_bos_token = special.add_bos_token.unwrap_or(false) && bos_id.is_some();
        let add_eos_token = special.add_eos_token.unwrap_or(false) && eos_id.is_some();
        let explicit = special.add_bos_token.is_some() || special.add_eos_token.is_some();
        if explicit || inner.get_post_processor().is_none() {
            let processor = bos_eos_processor(
                special
                    .bos_token
                    .as_deref()
                    .zip(bos_id)
                    .filter(|_| add_bos_token),
                special
                    .eos_token
                    .as_deref()
                    .zip(eos_id)
                    .filter(|_| add_eos_token),
            )?;
            inner.with_post_processor(Some(processor));
        }

        let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
        for id in extra_eos {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }

        let mut compiled = Vec::with_capacity(templates.len());
        for (name, source) in templates {
            compiled.push(ChatTemplate::new(&name, &source)?);
        }
        compiled.sort_by_key(|t| t.name() != DEFAULT_TEMPLATE);

        let mut tok = Tokenizer {
            inner,
            tokens: TemplateTokens {
                bos_token: special.bos_token,
                eos_token: special.eos_token,
                unk_token: special.unk_token,
                pad_token: special.pad_token,
            },
            bos_id,
            config_eos: eos_ids.clone(),
            eos_ids,
            pad_id,
            add_bos_token,
            add_eos_token,
            templates: compiled,
            source_desc,
        };
        tok.refresh_eos_ids();
        Ok(tok)
    }

    /// The token the default chat template ends an assistant turn with, when it is a special
    /// token: the last trained token of a one-turn probe render (Gemma's `<end_of_turn>`, ChatML's
    /// `<|im_end|>`, Llama 3's `<|eot_id|>`). None without a template, when the template refuses
    /// the probe, or when the turn ends in ordinary text.
    pub fn end_of_turn_id(&self) -> Option<u32> {
        let probe = [Message::user("Hi"), Message::assistant("Hello")];
        let template = self.pick_template(false).ok()?;
        let r = self.render_masked(template, &probe, false, None, 0).ok()?;
        let last = r
            .ids
            .iter()
            .zip(&r.assistant_mask)
            .rev()
            .find(|(_, &m)| m == 1)
            .map(|(&id, _)| id)?;
        let special = self
            .inner
            .get_added_tokens_decoder()
            .get(&last)
            .is_some_and(|t| t.special);
        special.then_some(last)
    }

    /// Recomputes `eos_ids` from the config's and the default template's end-of-turn.
    fn refresh_eos_ids(&mut self) {
        let mut ids = self.config_eos.clone();
        if let Some(id) = self.end_of_turn_id() {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        self.eos_ids = ids;
    }

    /// Token ids of `text`. With `add_special_tokens` the post-processor adds what the model's
    /// config asks for (e.g. BOS); chat renders use `false` because templates write their own.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TokenizeError::tokenizers("encode", &e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids plus each token's byte range in `text` (no special tokens added).
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizeError::tokenizers("encode", &e))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizeError::tokenizers("decode", &e))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Every id that ends a turn: the config's `eos_token` first, then `generation_config.json`'s
    /// `eos_token_id` entries (e.g. Llama 3's `<|eot_id|>` and `<|eom_id|>`), then the default
    /// chat template's end-of-turn token ([`Tokenizer::end_of_turn_id`]) if not among them — a
    /// base GGUF given Gemma's template stops at `<end_of_turn>` as well as `<eos>`.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.tokens.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.tokens.eos_token.as_deref()
    }

    /// Whether `encode(text, true)` prepends BOS (transformers' `add_bos_token`).
    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token
    }

    /// Whether `encode(text, true)` appends EOS (transformers' `add_eos_token`).
    pub fn add_eos_token(&self) -> bool {
        self.add_eos_token
    }

    /// Vocabulary size including added tokens (transformers' `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Why two tokenizers do not map text to the same ids, or None when they do: the same
    /// vocabulary (every token string to the same id, added tokens included). Two models may
    /// only exchange token ids or per-token distributions (distillation, speculative decoding)
    /// when this is None. Merges and normalizers are not compared: equal vocabularies from
    /// different merges are vanishingly rare among released checkpoints, and the ids are what
    /// must agree.
    pub fn vocab_mismatch(&self, other: &Tokenizer) -> Option<String> {
        let (a, b) = (self.inner.get_vocab(true), other.inner.get_vocab(true));
        if a.len() != b.len() {
            return Some(format!("{} tokens vs {}", a.len(), b.len()));
        }
        let mut diff: Vec<(&String, u32)> = a
            .iter()
            .filter(|(tok, id)| b.get(*tok) != Some(*id))
            .map(|(tok, id)| (tok, *id))
            .collect();
        diff.sort_by_key(|&(_, id)| id);
        diff.first().map(|(tok, id)| match b.get(*tok) {
            Some(other_id) => format!("token {tok:?} is id {id} in one, {other_id} in the other"),
            None => format!("token {tok:?} (id {id}) is missing from the other"),
        })
    }

    /// The default chat template's source, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.templates.first().map(|t| t.source())
    }

    /// A template by name (`default`, `tool_use`, …).
    pub fn chat_template_named(&self, name: &str) -> Option<&ChatTemplate> {
        self.templates.iter().find(|t| t.name() == name)
    }

    /// Replaces (or adds) the default chat template, e.g. for a base model without one.
    pub fn set_chat_template(&mut self, source: &str) -> Result<()> {
        let template = ChatTemplate::new(DEFAULT_TEMPLATE, source)?;
        self.templates.retain(|t| t.name() != DEFAULT_TEMPLATE);
        self.templates.insert(0, template);
        self.refresh_eos_ids();
        Ok(())
    }

    /// Names where the tokenizer came from in its errors (e.g. the GGUF file's path).
    pub fn set_source_desc(&mut self, desc: impl Into<String>) {
        self.source_desc = desc.into();
    }

    /// The underlying `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// transformers' choice: `tool_use` when tools are given and it exists, else `default`, else
    /// the only template.
    fn pick_template(&self, with_tools: bool) -> Result<&ChatTemplate> {
        if with_tools {
            if let Some(t) = self.chat_template_named(TOOL_USE_TEMPLATE) {
                return Ok(t);
            }
        }
        if let Some(t) = self.chat_template_named(DEFAULT_TEMPLATE) {
            return Ok(t);
        }
        match self.templates.as_slice() {
            [] => Err(TokenizeError::NoChatTemplate {
                source_desc: self.source_desc.clone(),
            }),
            [only] => Ok(only),
            many => Err(TokenizeError::UnknownTemplate {
                name: DEFAULT_TEMPLATE.into(),
                available: many.iter().map(|t| t.name().to_string()).collect(),
            }),
        }
    }

    /// The chat text only, like `apply_chat_template(messages, tokenize=False)`.
    pub fn render_text(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.pick_template(false)?
            .render_text(messages, add_generation_prompt, None, &self.tokens)
    }

    /// Renders a conversation with the default template: text as `apply_chat_template`, ids as
    /// `apply_chat_template(tokenize=True)` (= `encode(text, false)`), and the assistant mask by
    /// the rule documented in `chat.rs` (reply + end-of-turn marker of every assistant message).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Rendered> {
        self.render_with_tools(messages, add_generation_prompt, None)
    }

    /// The ids of a render without the assistant mask, like `apply_chat_template(messages,
    /// tools=tools, tokenize=True)`.
    pub fn render_ids(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>> {
        let text = self.pick_template(tools.is_some())?.render_text(
            messages,
            add_generation_prompt,
            tools,
            &self.tokens,
        )?;
        self.encode(&text, false)
    }

    /// `render` with a `tools` list (JSON schemas) passed to the template.
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<Rendered> {
        let template = self.pick_template(tools.is_some())?;
        self.render_masked(template, messages, add_generation_prompt, tools, 0)
    }

    /// Renders with an explicit template (for tests and for models whose template lives elsewhere).
    pub fn render_with_template(
        &self,
        template: &ChatTemplate,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<Rendered> {
        self.render_masked(template, messages, add_generation_prompt, tools, 0)
    }

    /// Masks only assistant messages at index `first_masked` or later.
    fn render_masked(
        &self,
        template: &ChatTemplate,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
        first_masked: usize,
    ) -> Result<Rendered> {
        let (text, spans) = template.render_with_assistant_spans(
            messages,
            add_generation_prompt,
            tools,
            &self.tokens,
        )?;
        // Spans come in message order; drop those of prompt-side assistant messages.
        let n_skip = messages[..first_masked.min(messages.len())]
            .iter()
            .filter(|m| m.role == "assistant")
            .count();
        let spans = &spans[n_skip.min(spans.len())..];
        let (ids, offsets) = self.encode_with_offsets(&text)?;
        let assistant_mask = mask_from_spans(&offsets, spans);
        Ok(Rendered {
            text,
            ids,
            assistant_mask,
        })
    }

    /// Plain-text prompt/completion (TRL's `prompt`/`completion` columns without chat):
    /// `encode(prompt, true) ++ encode(completion, false) ++ [eos]`, mask on the completion and
    /// the EOS. Prompt and completion are tokenized separately so the boundary is exact (the
    /// completion's ids are the ones a rollout would sample). BOS comes from the tokenizer's own
    /// rule (`add_bos_token`); EOS is appended unless the completion already ends with it, as
    /// TRL's SFT does, so the model learns to stop.
    pub fn render_prompt_completion(&self, prompt: &str, completion: &str) -> Result<Rendered> {
        let prompt_ids = self.encode(prompt, true)?;
        let mut completion_ids = self.encode(completion, false)?;
        let mut text = format!("{prompt}{completion}");
        if let (Some(eos_token), Some(&eos_id)) = (self.eos_token(), self.eos_ids.first()) {
            if completion_ids.last() != Some(&eos_id) {
                completion_ids.push(eos_id);
                text.push_str(eos_token);
            }
        }
        let mut assistant_mask = vec![0u8; prompt_ids.len()];
        assistant_mask.resize(prompt_ids.len() + completion_ids.len(), 1);
        let mut ids = prompt_ids;
        ids.extend(completion_ids);
        Ok(Rendered {
            text,
            ids,
            assistant_mask,
        })
    }

    /// Conversational prompt/completion: the two lists rendered as one conversation, with the
    /// mask on the completion's assistant messages only.
    pub fn render_chat_prompt_completion(
        &self,
        prompt: &[Message],
        completion: &[Message],
    ) -> Result<Rendered> {
        let mut messages = prompt.to_vec();
        messages.extend_from_slice(completion);
        let template = self.pick_template(false)?;
        self.render_masked(template, &messages, false, None, prompt.len())
    }
}

/// `[bos] $A [eos]` (and the pair form), as transformers' `update_post_processor` builds it.
fn bos_eos_processor(
    bos: Option<(&str, u32)>,
    eos: Option<(&str, u32)>,
) -> Result<TemplateProcessing> {
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Vec::new();
    if let Some((t, id)) = bos {
        single.push(format!("{t}:0"));
        specials.push((t.to_string(), id));
    }
    single.push("$A:0".to_string());
    if let Some((t, id)) = eos {
        single.push(format!("{t}:0"));
        specials.push((t.to_string(), id));
    }
    pair.extend(single.iter().cloned());
    if let Some((t, _)) = bos {
        pair.push(format!("{t}:1"));
    }
    pair.push("$B:1".to_string());
    if let Some((t, _)) = eos {
        pair.push(format!("{t}:1"));
    }
    let err = |e: String| TokenizeError::Tokenizers {
        context: "building the BOS/EOS post-processor".into(),
        message: e,
    };
    let mut builder = TemplateProcessing::builder();
    builder.try_single(single).map_err(|e| err(e.to_string()))?;
    builder.try_pair(pair).map_err(|e| err(e.to_string()))?;
    builder.special_tokens(specials);
    builder.build().map_err(|e| err(e.to_string()))
}
