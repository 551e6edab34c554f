//! Chat: a model's own Jinja chat template rendered with a real Jinja engine (minijinja, with
//! Python-style string/dict methods and the `raise_exception` / `strftime_now` helpers that
//! transformers provides), and the conversation history kept within the context window.
//!
//! [`ChatSession`] is the turn policy on top: which template, how much of the context the reply
//! may use, which old turns to drop, and the history.
//!
//! Like transformers, the environment trims blocks (`trim_blocks`, `lstrip_blocks`) and gets
//! `messages`, `add_generation_prompt`, `bos_token` and `eos_token`.

use serde::Serialize;

use crate::InferError;
use kiln_data::{KilnTokenizer, ModelTokenizer};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant turn's tool calls, as transformers passes them to a template:
    /// `[{"type": "function", "function": {"name", "arguments": {...}}}]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
        }
    }

    /// An assistant turn that calls tools (`calls` as in [`Message::tool_calls`]).
    pub fn tool_calls(calls: serde_json::Value) -> Self {
        Self {
            role: "assistant".into(),
            content: String::new(),
            tool_calls: Some(calls),
        }
    }
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=indent,
/// sort_keys=sort_keys)`, i.e. Python's separators (`", "` and `": "` on one line, `","` and
/// `": "` with an indent), keys in their order, nothing HTML-escaped. (minijinja's own
/// `tojson` is Jinja2's: compact and HTML-escaped, which would render tool definitions and
/// tool calls differently from transformers.)
fn python_tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> Result<minijinja::Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut json = serde_json::to_value(&value).map_err(|e| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    })?;
    if sort_keys == Some(true) {
        json.sort_all_objects();
    }
    let mut out = String::new();
    write_python_json(&json, indent, 0, &mut out);
    Ok(minijinja::Value::from_safe_string(out))
}

/// `json.dumps` layout of `v` (strings and numbers escaped as serde_json does, which matches
/// Python's with `ensure_ascii=False`).
fn write_python_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let comma = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(comma);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(comma);
                }
                newline(out, depth + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
    has_generation_tags: bool,
}

/// Marks the start and end of `{% generation %}` spans in
/// [`ChatTemplate::render_marked`]'s output (Unicode private-use characters, which no
/// conversation is expected to contain).
pub const GENERATION_START: char = '\u{E000}';
pub const GENERATION_END: char = '\u{E001}';

/// Rewrites transformers' `{% generation %}` / `{% endgeneration %}` tags (which minijinja does
/// not parse) into blocks that print the markers when the `__kiln_generation_start` / `_end`
/// variables are set and nothing otherwise. Each tag becomes `{% if true %}...{% endif %}`, a
/// block tag like the original, so `trim_blocks` / `lstrip_blocks` act on the text around it
/// exactly as before. Returns the new source and whether there were any tags.
pub fn rewrite_generation_tags(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(open) = rest.find("{%") {
        let Some(close_rel) = rest[open..].find("%}") else {
            break;
        };
        let close = open + close_rel + 2;
        let inner = &rest[open + 2..close - 2];
        let (lead, trail) = (inner.starts_with('-'), inner.ends_with('-'));
        let word = inner.trim_matches('-').trim();
        let var = match word {
            "generation" => Some("__kiln_generation_start"),
            "endgeneration" => Some("__kiln_generation_end"),
            _ => None,
        };
        out.push_str(&rest[..open]);
        match var {
            Some(v) => {
                found = true;
                let (l, t) = (if lead { "-" } else { "" }, if trail { "-" } else { "" });
                out.push_str(&format!("{{%{l} if true %}}{{{{ {v} }}}}{{% endif {t}%}}"));
            }
            None => out.push_str(&rest[open..close]),
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    (out, found)
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

fn template_error(what: &str, e: minijinja::Error) -> InferError {
    // minijinja's Display carries the line; the chain has the details.
    let mut msg = format!("{what}: {e}");
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    InferError::Template(msg)
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's civil_from_days).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `strftime_now(fmt)`: today's date (UTC) for the common `%Y %m %d %B %b` directives.
fn strftime_now(fmt: String) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let month = MONTHS[(m - 1) as usize];
    fmt.replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", month)
        .replace("%b", &month[..3])
}

impl ChatTemplate {
    /// Compiles `source` (the model's `chat_template`); `bos`/`eos` are the special token
    /// strings the template may print.
    pub fn new(source: &str, bos: Option<&str>, eos: Option<&str>) -> Result<Self, InferError> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    format!("the chat template raised: {msg}"),
                ))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", python_tojson);
        let (source, has_generation_tags) = rewrite_generation_tags(source);
        env.add_template_owned("chat", source)
            .map_err(|e| template_error("compiling the chat template", e))?;
        Ok(Self {
            env,
            bos_token: bos.unwrap_or_default().to_string(),
            eos_token: eos.unwrap_or_default().to_string(),
            has_generation_tags,
        })
    }

    /// Whether the template marks assistant text with `{% generation %}` tags.
    pub fn has_generation_tags(&self) -> bool {
        self.has_generation_tags
    }

    /// [`render`](Self::render) with [`GENERATION_START`] / [`GENERATION_END`] around every
    /// `{% generation %}` span (nothing extra when the template has none).
    pub fn render_marked(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, InferError> {
        self.render_with_tools(messages, None, add_generation_prompt, true)
    }

    /// Renders a conversation; with `add_generation_prompt` the text ends where the
    /// assistant's reply starts.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, InferError> {
        self.render_with_tools(messages, None, add_generation_prompt, false)
    }

    /// Renders messages given as JSON values (a server's messages may carry `tool_calls`,
    /// `tool_call_id` and `name`), with the tool definitions the template may print.
    pub fn render_values(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, InferError> {
        self.render_context(
            minijinja::Value::from_serialize(messages),
            tools,
            add_generation_prompt,
            ("", ""),
        )
    }

    /// [`render`](Self::render) or [`render_marked`](Self::render_marked) with the tool
    /// definitions (`[{"type": "function", "function": {...}}]`) the template may print.
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        marked: bool,
    ) -> Result<String, InferError> {
        let (start, end) = if marked {
            (GENERATION_START.to_string(), GENERATION_END.to_string())
        } else {
            (String::new(), String::new())
        };
        self.render_context(
            minijinja::Value::from_serialize(messages),
            tools,
            add_generation_prompt,
            (&start, &end),
        )
    }

    /// The template rendered with transformers' context, and kiln's generation markers.
    fn render_context(
        &self,
        messages: minijinja::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        (start, end): (&str, &str),
    ) -> Result<String, InferError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| template_error("chat template", e))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => tools.map(minijinja::Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            __kiln_generation_start => start,
            __kiln_generation_end => end,
        })
        .map_err(|e| template_error("rendering the chat template", e))
    }
}

/// A conversation: an optional system prompt and the turns so far.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    pub system: Option<String>,
    pub turns: Vec<Message>,
}

impl Conversation {
    pub fn new(system: Option<String>) -> Self {
        Self {
            system,
            turns: Vec::new(),
        }
    }

    /// The system prompt (if any) followed by the turns from `first` on.
    fn messages_from(&self, first: usize) -> Vec<Message> {
        let mut m: Vec<Message> = self
            .system
            .iter()
            .map(|s| Message::new("system", s))
            .collect();
        m.extend(self.turns[first..].iter().cloned());
        m
    }

    /// Token ids of the prompt for the next reply, dropping the oldest turns (whole
    /// user/assistant exchanges; the system prompt is kept) until the prompt plus `reserve`
    /// new tokens fit in `max_tokens`. Returns the ids and how many turns were dropped.
    /// The rendered text is tokenized like any text, with special tokens written in it
    /// recognised; `bos` is put first when the model wants it and the template did not.
    pub fn prompt_ids(
        &self,
        template: &ChatTemplate,
        tokenizer: &KilnTokenizer,
        bos: Option<u32>,
        max_tokens: usize,
        reserve: usize,
    ) -> Result<(Vec<u32>, usize), InferError> {
        let budget = max_tokens.saturating_sub(reserve.max(1));
        let mut first = 0;
        loop {
            let text = template.render(&self.messages_from(first), true)?;
            let mut ids = tokenizer.encode(&text)?;
            if let Some(b) = bos {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
            if ids.len() <= budget {
                return Ok((ids, first));
            }
            // Drop the oldest exchange, but never the turn being answered.
            let next = self.turns[first..]
                .iter()
                .skip(1)
                .position(|m| m.role == "user")
                .map(|p| first + 1 + p);
            match next {
                Some(n) if n < self.turns.len() => first = n,
                _ => {
                    return Err(InferError::TurnTooLong {
                        prompt: ids.len(),
                        budget,
                        max_context: max_tokens,
                        reserve: reserve.max(1),
                    })
                }
            }
        }
    }
}

/// Settings of a [`ChatSession`].
#[derive(Debug, Clone, Default)]
pub struct ChatConfig {
    /// System prompt (kept through every trim). `None` lets the template use its default.
    pub system: Option<String>,
    /// A Jinja chat template used instead of the model's own.
    pub template: Option<String>,
    /// Tokens the conversation may use, prompt and reply together (default, and at most: the
    /// model's context window).
    pub max_context: Option<usize>,
    /// Most tokens a reply may have.
    pub max_new_tokens: usize,
}

/// What to generate for the turn just added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    /// The rendered history, ending where the assistant's reply starts.
    pub prompt_ids: Vec<u32>,
    /// Tokens the reply may use: the configured maximum, capped so prompt and reply fit the
    /// session's context.
    pub max_new_tokens: usize,
    /// Turns dropped from the front of the history (whole exchanges) to make room.
    pub dropped_turns: usize,
}

/// A multi-turn chat: the template, the history and the policy that keeps it within the
/// context. Each [`user_turn`](Self::user_turn) adds the user's message and returns the prompt
/// ids; the oldest exchanges are dropped (the system prompt never) until the prompt leaves
/// [`reply_budget`](Self::reply_budget) tokens of [`max_context`](Self::max_context) for the
/// reply. [`record_reply`](Self::record_reply) adds the assistant's answer to the history.
#[derive(Debug)]
pub struct ChatSession {
    template: ChatTemplate,
    convo: Conversation,
    max_context: usize,
    max_new_tokens: usize,
}

impl ChatSession {
    /// A session with `tokenizer`'s chat template (or `cfg.template`) for a model whose
    /// context window is `model_context` tokens.
    pub fn new(
        tokenizer: &ModelTokenizer,
        model_context: usize,
        cfg: ChatConfig,
    ) -> Result<Self, InferError> {
        let source = match cfg.template.or_else(|| tokenizer.chat_template.clone()) {
            Some(s) => s,
            None => return Err(InferError::NoChatTemplate(tokenizer.source.clone())),
        };
        let template = ChatTemplate::new(
            &source,
            tokenizer.bos.as_ref().map(|b| b.1.as_str()),
            tokenizer.eos.as_ref().map(|e| e.1.as_str()),
        )?;
        let max_context = cfg.max_context.unwrap_or(model_context).min(model_context);
        if max_context < 2 {
            return Err(InferError::Sampling(format!(
                "a chat needs a context of at least 2 tokens, got {max_context}"
            )));
        }
        Ok(Self {
            template,
            convo: Conversation::new(cfg.system),
            max_context,
            max_new_tokens: cfg.max_new_tokens.max(1),
        })
    }

    /// Tokens the conversation may use, prompt and reply together.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Tokens kept free for the reply when the history is trimmed: the reply length asked
    /// for, but at most half the context (so a long reply budget never starves the history).
    pub fn reply_budget(&self) -> usize {
        self.max_new_tokens.min(self.max_context / 2).max(1)
    }

    /// The turns kept so far (without the system prompt).
    pub fn history(&self) -> &[Message] {
        &self.convo.turns
    }

    pub fn system(&self) -> Option<&str> {
        self.convo.system.as_deref()
    }

    /// Forgets every turn (the system prompt stays).
    pub fn reset(&mut self) {
        self.convo.turns.clear();
    }

    /// Adds the user's message and returns the prompt for the reply, dropping the oldest
    /// exchanges that no longer fit. A message that cannot fit even alone is an error
    /// ([`InferError::TurnTooLong`]) and leaves the history as it was.
    pub fn user_turn(
        &mut self,
        tokenizer: &KilnTokenizer,
        text: &str,
    ) -> Result<ChatTurn, InferError> {
        self.convo.turns.push(Message::new("user", text));
        let reserve = self.reply_budget();
        let (prompt_ids, dropped) =
            match self
                .convo
                .prompt_ids(&self.template, tokenizer, None, self.max_context, reserve)
            {
                Ok(r) => r,
                Err(e) => {
                    self.convo.turns.pop();
                    return Err(e);
                }
            };
        self.convo.turns.drain(..dropped);
        let room = self.max_context.saturating_sub(prompt_ids.len());
        Ok(ChatTurn {
            max_new_tokens: self.max_new_tokens.min(room),
            prompt_ids,
            dropped_turns: dropped,
        })
    }

    /// Adds the assistant's reply (trailing whitespace trimmed) to the history.
    pub fn record_reply(&mut self, text: &str) {
        self.convo
            .turns
            .push(Message::new("assistant", text.trim_end()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_like_transformers() {
        let t = ChatTemplate::new(CHATML, None, Some("<|im_end|>")).unwrap();
        let out = t.render(&[Message::new("user", "Hi there")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "x"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nx<|im_end|>\n"
        );
    }

    #[test]
    fn python_methods_blocks_and_exceptions() {
        // Llama-2 style: strip(), raise_exception, bos/eos, trim_blocks.
        let src = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}\n{% for m in messages %}\n{{ bos_token }}[INST] {{ m['content'].strip() }} [/INST]{{ eos_token }}\n{% endfor %}";
        let t = ChatTemplate::new(src, Some("<s>"), Some("</s>")).unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  hi  ")], false).unwrap(),
            "<s>[INST] hi [/INST]</s>\n"
        );
        let e = t
            .render(&[Message::new("system", "s")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no system"), "{e}");
        assert!(ChatTemplate::new("{% for %}", None, None).is_err());
        let date = strftime_now("%d %B %Y".into());
        assert_eq!(date.len(), date.trim().len());
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }

    /// A small byte-level BPE and a plain template (`<role>content` lines).
    fn tokenizer(template: Option<&str>) -> ModelTokenizer {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("t.txt");
        std::fs::write(
            &text,
            "user assistant system Question number answer of some length Be brief.\n".repeat(40),
        )
        .unwrap();
        let opts = kiln_data::BpeTrainOptions {
            vocab_size: 300,
            ..Default::default()
        };
        ModelTokenizer {
            tokenizer: kiln_data::train_bpe(&[text], &opts).unwrap(),
            bos: None,
            eos: None,
            add_bos: false,
            chat_template: template.map(str::to_string),
            stop_ids: vec![],
            source: "model.gguf".into(),
        }
    }

    const PLAIN: &str = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

    fn session(max_context: usize, max_new_tokens: usize) -> (ModelTokenizer, ChatSession) {
        let tok = tokenizer(Some(PLAIN));
        let s = ChatSession::new(
            &tok,
            1000,
            ChatConfig {
                system: Some("Be brief.".into()),
                template: None,
                max_context: Some(max_context),
                max_new_tokens,
            },
        )
        .unwrap();
        (tok, s)
    }

    #[test]
    fn trimming_keeps_the_system_prompt_and_the_newest_turns() {
        let (tok, mut s) = session(160, 40);
        assert_eq!((s.max_context(), s.reply_budget()), (160, 40));
        let mut dropped_total = 0;
        for i in 0..12 {
            let turn = s
                .user_turn(&tok.tokenizer, &format!("Question number {i}"))
                .unwrap();
            // The prompt leaves the reply budget free, and the reply fits what is left.
            assert!(
                turn.prompt_ids.len() <= 160 - 40,
                "{}",
                turn.prompt_ids.len()
            );
            assert!(turn.max_new_tokens <= 40);
            assert!(turn.prompt_ids.len() + turn.max_new_tokens <= 160);
            assert!(turn.max_new_tokens >= s.reply_budget());
            assert_eq!(turn.dropped_turns % 2, 0, "whole exchanges are dropped");
            dropped_total += turn.dropped_turns;
            let text = tok.tokenizer.decode(&turn.prompt_ids).unwrap();
            assert!(text.starts_with("<system>Be brief.\n"), "{text}");
            assert!(
                text.ends_with(&format!("<user>Question number {i}\n<assistant>")),
                "{text}"
            );
            s.record_reply(&format!("answer of some length {i}  \n"));
        }
        assert!(dropped_total > 0, "12 exchanges do not fit in 120 tokens");
        // The history holds the newest exchanges only, oldest dropped first, replies trimmed.
        let h = s.history();
        assert_eq!(
            h.last().unwrap(),
            &Message::new("assistant", "answer of some length 11")
        );
        assert_eq!(h[0].role, "user");
        assert!(!h.iter().any(|m| m.content == "Question number 0"));
        assert_eq!(h.len(), 24 - dropped_total);
        s.reset();
        assert!(s.history().is_empty());
        assert_eq!(s.system(), Some("Be brief."));
    }

    #[test]
    fn a_single_turn_too_long_is_a_clear_error() {
        let (tok, mut s) = session(100, 30);
        s.user_turn(&tok.tokenizer, "Question number 1").unwrap();
        s.record_reply("answer 1");
        let before = s.history().to_vec();
        let e = s
            .user_turn(&tok.tokenizer, &"answer of some length ".repeat(40))
            .unwrap_err();
        assert!(
            matches!(
                e,
                InferError::TurnTooLong {
                    budget: 70,
                    max_context: 100,
                    reserve: 30,
                    ..
                }
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("70") && msg.contains("100-token context"),
            "{msg}"
        );
        // The history is as it was, and the next turn works.
        assert_eq!(s.history(), &before[..]);
        let turn = s.user_turn(&tok.tokenizer, "Question number 2").unwrap();
        assert_eq!(turn.dropped_turns, 0);
    }

    #[test]
    fn template_choice_and_budgets() {
        // No template: a clear error naming the model; an explicit one is used instead.
        let bare = tokenizer(None);
        let cfg = ChatConfig {
            max_new_tokens: 500,
            ..Default::default()
        };
        let e = ChatSession::new(&bare, 64, cfg.clone())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.gguf") && e.contains("chat template"),
            "{e}"
        );
        let mut s = ChatSession::new(
            &bare,
            64,
            ChatConfig {
                template: Some("{% for m in messages %}[{{ m.content }}]{% endfor %}".into()),
                max_context: Some(10_000),
                ..cfg
            },
        )
        .unwrap();
        // The context is capped at the model's, and the reply reserve at half of it.
        assert_eq!((s.max_context(), s.reply_budget()), (64, 32));
        let turn = s.user_turn(&bare.tokenizer, "Be brief.").unwrap();
        assert_eq!(
            bare.tokenizer.decode(&turn.prompt_ids).unwrap(),
            "[Be brief.]"
        );
        assert_eq!(turn.max_new_tokens, 64 - turn.prompt_ids.len());
        // The model's own template otherwise.
        let tok = tokenizer(Some(PLAIN));
        let mut s = ChatSession::new(
            &tok,
            64,
            ChatConfig {
                max_new_tokens: 8,
                ..Default::default()
            },
        )
        .unwrap();
        let turn = s.user_turn(&tok.tokenizer, "hi").unwrap();
        assert_eq!(
            tok.tokenizer.decode(&turn.prompt_ids).unwrap(),
            "<user>hi\n<assistant>"
        );
        assert_eq!(turn.max_new_tokens, 8);
    }
}
