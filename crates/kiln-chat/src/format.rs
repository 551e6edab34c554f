//! Conversations → token ids with assistant-only labels.
//!
//! The conversation is rendered with the chat template and tokenized once. The assistant spans
//! are then found in token space, never by searching decoded text:
//!
//! * with `{% generation %}` tags in the template, from the tags: the template is rendered
//!   with markers around each span and the byte ranges between the markers select the tokens
//!   whose offsets fall inside them;
//! * otherwise turn by turn: for assistant turn i, the prefix rendered up to the turn with the
//!   generation prompt and the prefix rendered through the turn are tokenized; the labels are
//!   the tokens between the two prefixes' lengths in the whole conversation's ids, cut after
//!   the last end-of-turn token (the newline many templates print after `<|im_end|>` is not
//!   the assistant's to predict).
//!
//! Every assistant turn of a multi-turn conversation is labelled, each through its end-of-turn
//! token.

use kiln_data::ModelTokenizer;
use kiln_infer::{ChatTemplate, Message, GENERATION_END, GENERATION_START};

use crate::{ChatError, Conversation};

/// kiln's plain template for models without one (see `templates/plain.jinja`).
pub const PLAIN_TEMPLATE: &str = include_str!("../templates/plain.jinja");

/// A conversation as token ids with a label flag per token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// `labels[j]`: token j is an assistant token (or closes an assistant turn) and is
    /// predicted from the tokens before it.
    pub labels: Vec<bool>,
}

impl Example {
    pub fn n_labels(&self) -> usize {
        self.labels.iter().filter(|&&l| l).count()
    }
}

/// The chat template, tokenizer and special tokens that turn conversations into examples.
pub struct ChatFormat {
    pub template: ChatTemplate,
    /// The Jinja source used (recorded in the run).
    pub source: String,
    pub tokenizer: ModelTokenizer,
    /// Tokens that close an assistant turn (the model's stop ids).
    end_of_turn: Vec<u32>,
    /// Put BOS first when the model wants it and the template did not print it.
    bos: Option<u32>,
}

impl ChatFormat {
    /// `template`: a Jinja source overriding the model's own; without either, kiln's plain
    /// template.
    pub fn new(tokenizer: ModelTokenizer, template: Option<String>) -> Result<Self, ChatError> {
        let source = template
            .or_else(|| tokenizer.chat_template.clone())
            .unwrap_or_else(|| PLAIN_TEMPLATE.to_string());
        let compiled = ChatTemplate::new(
            &source,
            tokenizer.bos.as_ref().map(|b| b.1.as_str()),
            tokenizer.eos.as_ref().map(|e| e.1.as_str()),
        )?;
        let mut end_of_turn = tokenizer.stop_ids.clone();
        end_of_turn.extend(tokenizer.eos.as_ref().map(|e| e.0));
        let bos = tokenizer
            .bos
            .as_ref()
            .filter(|_| tokenizer.add_bos)
            .map(|b| b.0);
        Ok(Self {
            template: compiled,
            source,
            tokenizer,
            end_of_turn,
            bos,
        })
    }

    fn ids(&self, text: &str) -> Result<Vec<u32>, ChatError> {
        let mut ids = self.tokenizer.tokenizer.encode(text)?;
        if let Some(b) = self.bos {
            if ids.first() != Some(&b) {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }

    /// Token ids and labels of a conversation; `train_on_prompt` labels every token but the
    /// first.
    pub fn encode(
        &self,
        convo: &Conversation,
        train_on_prompt: bool,
    ) -> Result<Example, ChatError> {
        let messages = convo.messages();
        let err = |msg: String| ChatError::Record {
            origin: convo.origin.clone(),
            msg,
        };
        let tools = convo.tools.as_ref();
        self.check_tools(convo).map_err(err)?;
        let text = self
            .template
            .render_with_tools(&messages, tools, false, false)?;
        let ids = self.ids(&text)?;
        if ids.len() < 2 {
            return Err(err("renders to fewer than 2 tokens".into()));
        }
        let labels = if train_on_prompt {
            let mut l = vec![true; ids.len()];
            l[0] = false;
            l
        } else if self.template.has_generation_tags() {
            self.labels_from_tags(&messages, tools, &ids)
                .map_err(|m| err(m.to_string()))?
        } else {
            self.labels_turn_by_turn(&messages, tools, &text, &ids)
                .map_err(|m| err(m.to_string()))?
        };
        Ok(Example { ids, labels })
    }

    /// The prompt as the model sees it before answering: `messages` (ending with a user
    /// turn) rendered with the generation prompt.
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, ChatError> {
        self.ids(&self.template.render(messages, true)?)
    }

    /// `prompt` followed by an assistant turn `response`, as the model sees it: the ids through
    /// the turn's end-of-turn token, and where the response starts (the prompt's length).
    /// Rendered and labelled exactly as SFT renders a conversation.
    pub fn encode_completion(
        &self,
        prompt: &[Message],
        response: &str,
        origin: &str,
    ) -> Result<(Vec<u32>, usize), ChatError> {
        let err = |msg: String| ChatError::Record {
            origin: origin.to_string(),
            msg,
        };
        let mut messages = prompt.to_vec();
        messages.push(Message::new("assistant", response));
        let (system, turns) = match messages.first() {
            Some(m) if m.role == "system" => (Some(m.content.clone()), messages[1..].to_vec()),
            _ => (None, messages.clone()),
        };
        let convo = Conversation {
            system,
            turns,
            tools: None,
            origin: origin.to_string(),
        };
        let ex = self.encode(&convo, false)?;
        let start = common_prefix(&self.encode_prompt(prompt)?, &ex.ids);
        let Some(last) = ex.labels.iter().rposition(|&l| l) else {
            return Err(err("the response renders to no tokens".into()));
        };
        if last < start {
            return Err(err(
                "the chat template renders the prompt differently once a response follows it"
                    .into(),
            ));
        }
        Ok((ex.ids[..=last].to_vec(), start))
    }

    /// A conversation with tool definitions or calls needs a template that renders them
    /// (one that mentions `tools` and `tool_calls`, as transformers' tool-use templates do);
    /// another would silently drop them from the training text.
    fn check_tools(&self, convo: &Conversation) -> Result<(), String> {
        let calls = convo.turns.iter().any(|m| m.tool_calls.is_some());
        for (used, name) in [(convo.tools.is_some(), "tools"), (calls, "tool_calls")] {
            if used && !self.source.contains(name) {
                return Err(format!(
                    "the record has {name} but the chat template never renders `{name}`: use a model whose template supports tool use (e.g. Qwen2.5) or pass one with --template FILE"
                ));
            }
        }
        Ok(())
    }

    /// Tokens that close an assistant turn.
    pub fn end_of_turn(&self) -> &[u32] {
        &self.end_of_turn
    }

    /// Labels from `{% generation %}` spans: tokens whose byte range starts inside a span.
    fn labels_from_tags(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        ids: &[u32],
    ) -> Result<Vec<bool>, ChatError> {
        let marked = self
            .template
            .render_with_tools(messages, tools, false, true)?;
        let mut clean = String::with_capacity(marked.len());
        let mut spans = Vec::new();
        let mut open = None;
        for c in marked.chars() {
            match c {
                GENERATION_START => open = Some(clean.len()),
                GENERATION_END => {
                    if let Some(s) = open.take() {
                        spans.push((s, clean.len()));
                    }
                }
                c => clean.push(c),
            }
        }
        let enc = self
            .tokenizer
            .tokenizer
            .inner()
            .encode(clean.as_str(), false)
            .map_err(|e| ChatError::Template(format!("tokenizing the conversation: {e}")))?;
        let offset = ids.len() - enc.get_ids().len(); // a BOS kiln put first
        if enc.get_ids() != &ids[offset..] {
            return Err(ChatError::Template(
                "the template renders differently with generation markers".into(),
            ));
        }
        let mut labels = vec![false; ids.len()];
        for (j, &(start, end)) in enc.get_offsets().iter().enumerate() {
            if end > start && spans.iter().any(|&(s, e)| start >= s && start < e) {
                labels[offset + j] = true;
            }
        }
        Ok(labels)
    }

    /// Labels from rendering turn by turn (see the module docs).
    fn labels_turn_by_turn(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        text: &str,
        ids: &[u32],
    ) -> Result<Vec<bool>, ChatError> {
        let mut labels = vec![false; ids.len()];
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self
                .template
                .render_with_tools(&messages[..i], tools, true, false)?;
            let through = self
                .template
                .render_with_tools(&messages[..=i], tools, false, false)?;
            if !text.starts_with(&through) || !through.starts_with(&before) {
                return Err(ChatError::Template(format!(
                    "the chat template does not render conversations prefix by prefix (turn {i} renders differently inside the whole conversation), so the assistant tokens cannot be found turn by turn; use a template that marks them with {{% generation %}} tags (--template FILE)"
                )));
            }
            let start = common_prefix(&self.ids(&before)?, ids);
            let mut end = common_prefix(&self.ids(&through)?, ids);
            if let Some(last) = ids[start..end]
                .iter()
                .rposition(|t| self.end_of_turn.contains(t))
            {
                end = start + last + 1;
            }
            for l in &mut labels[start..end] {
                *l = true;
            }
        }
        Ok(labels)
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
