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
//! * Tool calling, in either list format with a top-level `tools` (a list of function
//!   definitions, or that list as a JSON string): LLaMA-Factory's ShareGPT roles
//!   `function_call` (the assistant's call, `{"name", "arguments"}` or a list of them, as JSON
//!   text) and `observation` (the tool's result), or OpenAI's messages (`assistant` with
//!   `tool_calls`, `tool` with the result). Calls become transformers' `tool_calls` and results
//!   `tool` turns, rendered by the model's own template (which must know tools); the calls are
//!   trained on like any assistant turn, the results are not.
//!
//! A file is a JSON array of records or JSONL (one record per line; blank lines are allowed).
//! A bad record is an error naming the file, the record (JSONL: its line) and the field;
//! with `skip_bad` it is skipped instead and counted in [`Records::skipped`].

use std::path::{Path, PathBuf};

use kiln_infer::Message;
use serde_json::Value;

use crate::ChatError;

/// One training conversation: an optional system prompt, then user and assistant turns (and
/// tool results).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub system: Option<String>,
    pub turns: Vec<Message>,
    /// Tool definitions as transformers passes them to a template:
    /// `[{"type": "function", "function": {"name", "description", "parameters"}}]`.
    pub tools: Option<Value>,
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
pub fn read_records(files: &[PathBuf], skip_bad: bool) -> Result<Records, ChatError> {
    let mut out = Records::default();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| ChatError::Io {
            path: file.clone(),
            source: e,
        })?;
        for (locus, parsed) in split_records(file, &text)? {
            let origin = format!("{}: {locus}", file.display());
            let result = parsed
                .map_err(|msg| ChatError::Record {
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
) -> Result<Vec<(String, Result<Value, String>)>, ChatError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let v: Value = serde_json::from_str(text).map_err(|e| ChatError::Record {
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
            return Err(ChatError::Record {
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
pub fn parse_record(v: &Value, origin: &str) -> Result<Conversation, ChatError> {
    let err = |msg: String| ChatError::Record {
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
                tools: None,
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
            tools: None,
            origin: origin.to_string(),
        }
    } else {
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        return Err(err(format!(
            "unknown record format (keys {keys:?}); expected Alpaca (instruction, input, output), messages ([{{role, content}}]), ShareGPT (conversations: [{{from, value}}]) or TRL's prompt-completion (prompt, completion)"
        )));
    };
    convo.tools = parse_tools(obj.get("tools")).map_err(err)?;
    if convo.turns.iter().any(|m| m.tool_calls.is_some()) && convo.tools.is_none() {
        return Err(err(
            "a tool call without tool definitions: give the functions in \"tools\"".into(),
        ));
    }
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
) -> Result<Conversation, ChatError> {
    let err = |msg: String| ChatError::Record {
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
        // OpenAI's assistant turn with tool calls may have no content.
        let openai_calls = t.get("tool_calls").filter(|v| !v.is_null());
        let content = string_field(t, content_key)
            .map_err(|m| err(format!("{at}: {m}")))?
            .or_else(|| openai_calls.map(|_| String::new()))
            .ok_or_else(|| err(format!("{at}: missing field {content_key:?}")))?;
        let role = match role.as_str() {
            "system" => "system",
            "user" | "human" => "user",
            "assistant" | "gpt" | "model" => "assistant",
            "function_call" => "function_call",
            "observation" | "tool" | "function" => "tool",
            other => {
                return Err(err(format!(
                    "{at}.{role_key}: unknown role {other:?} (expected system, user/human, assistant/gpt, or for tool calling function_call and observation/tool)"
                )))
            }
        };
        let message = match (role, openai_calls) {
            ("function_call", _) => {
                let calls: Value = serde_json::from_str(&content).map_err(|e| {
                    err(format!("{at}.{content_key}: a function call is JSON text ({{\"name\", \"arguments\"}}): {e}"))
                })?;
                Message::tool_calls(tool_calls(&calls).map_err(|m| err(format!("{at}: {m}")))?)
            }
            ("assistant", Some(calls)) => Message {
                tool_calls: Some(tool_calls(calls).map_err(|m| err(format!("{at}: {m}")))?),
                ..Message::new("assistant", &content)
            },
            (role, _) => Message::new(role, &content),
        };
        let role = message.role.as_str();
        if role == "system" {
            if i != 0 {
                return Err(err(format!("{at}: a system turn is allowed only first")));
            }
            system = Some(content);
            continue;
        }
        let prev = turns.last();
        match (prev.map(|m: &Message| m.role.as_str()), role) {
            // Several results may answer several calls.
            (Some("tool"), "tool") => {}
            (Some(p), r) if p == r => {
                return Err(err(format!(
                    "{at}: two {role} turns in a row; turns must alternate user / assistant"
                )))
            }
            (p, "tool")
                if p != Some("assistant") || prev.is_some_and(|m| m.tool_calls.is_none()) =>
            {
                return Err(err(format!(
                    "{at}: a tool result must follow the assistant's tool call"
                )))
            }
            _ => {}
        }
        turns.push(message);
    }
    Ok(Conversation {
        system,
        turns,
        tools: None,
        origin: origin.to_string(),
    })
}

/// Tool calls as transformers passes them to a template: `[{"type": "function", "function":
/// {"name", "arguments"}}]` with the arguments an object (OpenAI sends them as JSON text).
/// Accepts one call or a list, each `{"name", "arguments"}` or OpenAI's `{"type", "function"}`.
fn tool_calls(v: &Value) -> Result<Value, String> {
    let one = |c: &Value| -> Result<Value, String> {
        let f = c.get("function").unwrap_or(c);
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| "a tool call needs a \"name\" (string)".to_string())?;
        let arguments = match f.get("arguments") {
            Some(Value::String(text)) => serde_json::from_str(text)
                .map_err(|e| format!("the arguments of {name:?} are not JSON: {e}"))?,
            Some(a) => a.clone(),
            None => Value::Object(Default::default()),
        };
        Ok(
            serde_json::json!({"type": "function", "function": {"name": name, "arguments": arguments}}),
        )
    };
    match v {
        Value::Array(calls) if !calls.is_empty() => calls.iter().map(one).collect(),
        Value::Object(_) => Ok(Value::Array(vec![one(v)?])),
        other => Err(format!(
            "tool calls must be an object or a non-empty list, found {}",
            json_kind(other)
        )),
    }
}

/// A record's `tools`: a list of function definitions (or that list as JSON text, as
/// LLaMA-Factory stores it), each `{"name", "description", "parameters"}` or already
/// `{"type": "function", "function": {...}}`. None when absent or empty.
fn parse_tools(v: Option<&Value>) -> Result<Option<Value>, String> {
    let parsed;
    let list = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::String(s)) => {
            parsed = serde_json::from_str::<Value>(s)
                .map_err(|e| format!("field \"tools\" is text but not JSON: {e}"))?;
            &parsed
        }
        Some(v) => v,
    };
    let Value::Array(defs) = list else {
        return Err(format!(
            "field \"tools\" must be a list of function definitions, found {}",
            json_kind(list)
        ));
    };
    if defs.is_empty() {
        return Ok(None);
    }
    defs.iter()
        .map(|d| match d {
            Value::Object(o) if o.contains_key("function") => Ok(d.clone()),
            Value::Object(o) if o.contains_key("name") => {
                Ok(serde_json::json!({"type": "function", "function": d}))
            }
            _ => Err(format!(
                "field \"tools\": each entry is a function definition with a \"name\", found {}",
                json_kind(d)
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|v| Some(Value::Array(v)))
}
