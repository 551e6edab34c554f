//! Instruction records in the common JSON / JSONL formats, read into conversations.
//!
//! * Alpaca: `instruction`, optional `input` (appended to the instruction after a newline, as
//!   LLaMA-Factory does), `output`, optional `system`.
//! * messages: `messages: [{role, content}, ...]` with roles `system`, `user`, `assistant`.
//! * ShareGPT: `conversations: [{from, value}, ...]` with `from` one of `system` (first turn
//!   only), `human`/`user`, `gpt`/`assistant`; an optional top-level `system`.
//! * TRL's prompt-completion: `prompt` and `completion` as strings (a user turn and the
//!   assistant's reply), or as message lists (the conversational form: the prompt's turns,
//!   then the completion's).
//!
//! A file is a JSON array of records or JSONL (one record per line; blank lines are allowed).
//! A bad record is an error naming the file, the record (JSONL: its line) and the field;
//! with `skip_bad` it is skipped instead and counted in [`Records::skipped`].

use std::path::{Path, PathBuf};

use kiln_infer::Message;
use serde_json::Value;

use crate::SftError;

/// One training conversation: an optional system prompt, then user and assistant turns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub system: Option<String>,
    pub turns: Vec<Message>,
    /// Where it came from, for messages: `file:record N` / `file:line N`.
    pub origin: String,
}

impl Conversation {
    /// The messages a chat template renders: the system prompt (when set) and the turns.
    pub fn messages(&self) -> Vec<Message> {
        let mut m: Vec<Message> = self
            .system
            .iter()
            .map(|s| Message::new("system", s))
            .collect();
        m.extend(self.turns.iter().cloned());
        m
    }
}

/// What [`read_records`] found.
#[derive(Debug, Default)]
pub struct Records {
    pub conversations: Vec<Conversation>,
    /// Records skipped as bad (only with `skip_bad`), with the first few reasons.
    pub skipped: usize,
    pub skipped_examples: Vec<String>,
}

/// Reads every file (JSON array or JSONL) into conversations, in order.
pub fn read_records(files: &[PathBuf], skip_bad: bool) -> Result<Records, SftError> {
    let mut out = Records::default();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| SftError::Io {
            path: file.clone(),
            source: e,
        })?;
        for (locus, parsed) in split_records(file, &text)? {
            let origin = format!("{}: {locus}", file.display());
            let result = parsed
                .map_err(|msg| SftError::Record {
                    origin: origin.clone(),
                    msg,
                })
                .and_then(|v| parse_record(&v, &origin));
            match result {
                Ok(c) => out.conversations.push(c),
                Err(e) if skip_bad => {
                    out.skipped += 1;
                    if out.skipped_examples.len() < 5 {
                        out.skipped_examples.push(e.to_string());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}

/// The records of one file with their locus (`record N` in a JSON array, `line N` in JSONL):
/// parsed values, or why a JSONL line is not JSON.
#[allow(clippy::type_complexity)]
pub fn split_records(
    file: &Path,
    text: &str,
) -> Result<Vec<(String, Result<Value, String>)>, SftError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let v: Value = serde_json::from_str(text).map_err(|e| SftError::Record {
            origin: file.display().to_string(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let Value::Array(items) = v else {
            unreachable!("a JSON text starting with '[' is an array")
        };
        return Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("record {}", i + 1), Ok(v)))
            .collect());
    }
    if trimmed.starts_with('{') && serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object())
    {
        // A single object spanning the whole file: one record (unless it is one JSONL line).
        if text.trim().lines().count() > 1 {
            return Err(SftError::Record {
                origin: file.display().to_string(),
                msg: "a single JSON object; expected a JSON array of records or JSONL (one record per line)".into(),
            });
        }
    }
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            (
                format!("line {}", i + 1),
                serde_json::from_str::<Value>(l).map_err(|e| format!("not valid JSON: {e}")),
            )
        })
        .collect())
}

fn string_field(
    obj: &serde_json::Map<String, Value>,
    field: &str,
) -> Result<Option<String>, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!(
            "field {field:?} must be a string, found {}",
            json_kind(other)
        )),
    }
}

/// What kind of JSON value `v` is, for error messages ("found an array").
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One record → a conversation, or why not (naming the field).
pub fn parse_record(v: &Value, origin: &str) -> Result<Conversation, SftError> {
    let err = |msg: String| SftError::Record {
        origin: origin.to_string(),
        msg,
    };
    let Value::Object(obj) = v else {
        return Err(err(format!(
            "expected a JSON object, found {}",
            json_kind(v)
        )));
    };
    let system = string_field(obj, "system").map_err(err)?;
    let mut convo = if obj.contains_key("messages") {
        parse_turns(obj, "messages", "role", "content", origin)?
    } else if obj.contains_key("conversations") {
        parse_turns(obj, "conversations", "from", "value", origin)?
    } else if obj.contains_key("prompt") && obj.contains_key("completion") {
        match (&obj["prompt"], &obj["completion"]) {
            (Value::String(p), Value::String(c)) => Conversation {
                system: None,
                turns: vec![Message::new("user", p), Message::new("assistant", c)],
                origin: origin.to_string(),
            },
            (Value::Array(p), Value::Array(c)) => {
                let mut turns = serde_json::Map::new();
                turns.insert(
                    "prompt+completion".into(),
                    Value::Array(p.iter().chain(c).cloned().collect()),
                );
                parse_turns(&turns, "prompt+completion", "role", "content", origin)?
            }
            (p, c) => {
                return Err(err(format!(
                    "\"prompt\" is {} and \"completion\" is {}: both strings, or both message lists (TRL's prompt-completion format)",
                    json_kind(p),
                    json_kind(c)
                )))
            }
        }
    } else if obj.contains_key("instruction") || obj.contains_key("output") {
        let instruction = string_field(obj, "instruction")
            .map_err(err)?
            .ok_or_else(|| err("missing field \"instruction\" (Alpaca format)".into()))?;
        let output = string_field(obj, "output").map_err(err)?.ok_or_else(|| {
            err("missing field \"output\" (the assistant turn of an Alpaca record)".into())
        })?;
        let input = string_field(obj, "input").map_err(err)?.unwrap_or_default();
        let user = if input.trim().is_empty() {
            instruction
        } else {
            format!("{instruction}\n{input}")
        };
        Conversation {
            system: None,
            turns: vec![
                Message::new("user", &user),
                Message::new("assistant", &output),
            ],
            origin: origin.to_string(),
        }
    } else {
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        return Err(err(format!(
            "unknown record format (keys {keys:?}); expected Alpaca (instruction, input, output), messages ([{{role, content}}]), ShareGPT (conversations: [{{from, value}}]) or TRL's prompt-completion (prompt, completion)"
        )));
    };
    if let Some(s) = system {
        if convo.system.is_some() {
            return Err(err(
                "a system prompt both in \"system\" and as the first turn".into(),
            ));
        }
        convo.system = Some(s);
    }
    if !convo.turns.iter().any(|m| m.role == "assistant") {
        return Err(err(
            "no assistant turn: nothing to learn from this record".into()
        ));
    }
    if convo.turns.first().is_some_and(|m| m.role != "user") {
        return Err(err(format!(
            "the first turn (after any system prompt) is {:?}; a conversation starts with the user",
            convo.turns[0].role
        )));
    }
    Ok(convo)
}

/// The turns of a `messages` or `conversations` list.
fn parse_turns(
    obj: &serde_json::Map<String, Value>,
    list: &str,
    role_key: &str,
    content_key: &str,
    origin: &str,
) -> Result<Conversation, SftError> {
    let err = |msg: String| SftError::Record {
        origin: origin.to_string(),
        msg,
    };
    let Some(Value::Array(items)) = obj.get(list) else {
        return Err(err(format!("field {list:?} must be an array of turns")));
    };
    let mut system = None;
    let mut turns = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{list}[{i}]");
        let Value::Object(t) = item else {
            return Err(err(format!(
                "{at} must be an object, found {}",
                json_kind(item)
            )));
        };
        let role = string_field(t, role_key)
            .map_err(|m| err(format!("{at}: {m}")))?
            .ok_or_else(|| err(format!("{at}: missing field {role_key:?}")))?;
        let content = string_field(t, content_key)
            .map_err(|m| err(format!("{at}: {m}")))?
            .ok_or_else(|| err(format!("{at}: missing field {content_key:?}")))?;
        let role = match role.as_str() {
            "system" => "system",
            "user" | "human" => "user",
            "assistant" | "gpt" | "model" => "assistant",
            other => {
                return Err(err(format!(
                    "{at}.{role_key}: unknown role {other:?} (expected system, user/human or assistant/gpt)"
                )))
            }
        };
        if role == "system" {
            if i != 0 {
                return Err(err(format!("{at}: a system turn is allowed only first")));
            }
            system = Some(content);
            continue;
        }
        if let Some(prev) = turns.last().map(|m: &Message| m.role.as_str()) {
            if prev == role {
                return Err(err(format!(
                    "{at}: two {role} turns in a row; turns must alternate user / assistant"
                )));
            }
        }
        turns.push(Message::new(role, &content));
    }
    Ok(Conversation {
        system,
        turns,
        origin: origin.to_string(),
    })
}
