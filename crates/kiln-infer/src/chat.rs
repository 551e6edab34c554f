//! Chat: a model's own Jinja chat template rendered with a real Jinja engine (minijinja, with
//! Python-style string/dict methods and the `raise_exception` / `strftime_now` helpers that
//! transformers provides), and the conversation history kept within the context window.
//!
//! Like transformers, the environment trims blocks (`trim_blocks`, `lstrip_blocks`) and gets
//! `messages`, `add_generation_prompt`, `bos_token` and `eos_token`.

use serde::Serialize;

use crate::InferError;
use kiln_data::KilnTokenizer;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
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
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| template_error("compiling the chat template", e))?;
        Ok(Self {
            env,
            bos_token: bos.unwrap_or_default().to_string(),
            eos_token: eos.unwrap_or_default().to_string(),
        })
    }

    /// Renders a conversation; with `add_generation_prompt` the text ends where the
    /// assistant's reply starts.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, InferError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| template_error("chat template", e))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
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
                    return Err(InferError::PromptTooLong {
                        prompt: ids.len(),
                        max_seq_len: budget,
                    })
                }
            }
        }
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
}
