//! Preference pairs and prompts in the common JSON / JSONL forms.
//!
//! Preference records:
//! * `{prompt, chosen, rejected}`: the prompt a string or a message list (`[{role,
//!   content}]`), each response a string, a message object or a list ending with the
//!   assistant's message (TRL's conversational form);
//! * ShareGPT (LLaMA-Factory's `dpo_en_demo.json`): `conversations: [{from, value}]` ending
//!   with the user, and `chosen` / `rejected` single message objects `{from, value}`.
//!
//! Optional fields: `system` (a system prompt) and `margin` (a number, the reward model's
//! per-pair margin).
//!
//! Prompt records (PPO, GRPO): `{prompt}` (string or messages), `messages` or `conversations`
//! lists ending with the user, or Alpaca's `instruction` (with an optional `input` appended
//! after a newline, as SFT reads it; `output` is ignored). A file is a JSON array or JSONL;
//! errors name the file, the record (JSONL: its line) and the field.

use std::path::{Path, PathBuf};

use kiln_infer::Message;
use serde_json::{Map, Value};

use crate::RlhfError;
use kiln_chat::json_kind as kind;

/// One preference: a prompt (messages ending with a user turn) and two answers.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub prompt: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
    pub margin: f64,
    pub origin: String,
}

/// A prompt for on-policy methods, with its record (passed to reward programs).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRecord {
    pub prompt: Vec<Message>,
    pub record: Value,
    pub origin: String,
}

impl PromptRecord {
    /// The last user message: what a reward program sees as `prompt`.
    pub fn user_text(&self) -> &str {
        self.prompt
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or("", |m| m.content.as_str())
    }
}

fn io(path: &Path, e: std::io::Error) -> RlhfError {
    RlhfError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

fn role_of(s: &str) -> Option<&'static str> {
    match s {
        "system" => Some("system"),
        "user" | "human" => Some("user"),
        "assistant" | "gpt" | "model" => Some("assistant"),
        _ => None,
    }
}

/// One `{role, content}` or `{from, value}` message.
fn message(v: &Value, at: &str) -> Result<Message, String> {
    let Value::Object(o) = v else {
        return Err(format!("{at} must be a message object, found {}", kind(v)));
    };
    let (rk, ck) = if o.contains_key("from") {
        ("from", "value")
    } else {
        ("role", "content")
    };
    let get = |k: &str| match o.get(k) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("{at}.{k} must be a string, found {}", kind(other))),
        None => Err(format!("{at}: missing field {k:?}")),
    };
    let role = get(rk)?;
    let role = role_of(&role).ok_or_else(|| {
        format!("{at}.{rk}: unknown role {role:?} (expected system, user/human or assistant/gpt)")
    })?;
    Ok(Message::new(role, &get(ck)?))
}

/// A prompt: a string (one user turn) or a message list ending with the user.
fn prompt_messages(v: &Value, field: &str) -> Result<Vec<Message>, String> {
    let msgs = match v {
        Value::String(s) => vec![Message::new("user", s)],
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, m)| message(m, &format!("{field}[{i}]")))
            .collect::<Result<Vec<_>, _>>()?,
        other => {
            return Err(format!(
                "{field} must be a string or a list of messages, found {}",
                kind(other)
            ))
        }
    };
    if msgs.iter().skip(1).any(|m| m.role == "system") {
        return Err(format!("{field}: a system message is allowed only first"));
    }
    match msgs.last() {
        Some(m) if m.role == "user" => Ok(msgs),
        Some(m) => Err(format!(
            "{field} must end with a user message (the one to answer), not {:?}",
            m.role
        )),
        None => Err(format!("{field} is empty")),
    }
}

/// A response: a string, an assistant message object, or a list ending with one.
fn response_text(v: &Value, field: &str) -> Result<String, String> {
    let m = match v {
        Value::String(s) => return Ok(s.clone()),
        Value::Object(_) => message(v, field)?,
        Value::Array(items) => match items.last() {
            Some(last) => message(last, &format!("{field}[{}]", items.len() - 1))?,
            None => return Err(format!("{field} is an empty list")),
        },
        other => {
            return Err(format!(
                "{field} must be a string or an assistant message, found {}",
                kind(other)
            ))
        }
    };
    if m.role != "assistant" {
        return Err(format!(
            "{field} must be the assistant's message, not {:?}",
            m.role
        ));
    }
    Ok(m.content)
}

fn with_system(obj: &Map<String, Value>, mut prompt: Vec<Message>) -> Result<Vec<Message>, String> {
    match obj.get("system") {
        None | Some(Value::Null) => Ok(prompt),
        Some(Value::String(s)) if s.is_empty() => Ok(prompt),
        Some(Value::String(s)) => {
            if prompt.first().is_some_and(|m| m.role == "system") {
                return Err("a system prompt both in \"system\" and in the messages".into());
            }
            prompt.insert(0, Message::new("system", s));
            Ok(prompt)
        }
        Some(other) => Err(format!("system must be a string, found {}", kind(other))),
    }
}

/// One preference record, or why not (naming the field).
pub fn parse_preference(v: &Value, origin: &str) -> Result<PreferencePair, RlhfError> {
    let err = |msg: String| RlhfError::Record {
        origin: origin.to_string(),
        msg,
    };
    let Value::Object(obj) = v else {
        return Err(err(format!("expected a JSON object, found {}", kind(v))));
    };
    let prompt = if let Some(p) = obj.get("prompt") {
        prompt_messages(p, "prompt").map_err(err)?
    } else if let Some(c) = obj.get("conversations").or_else(|| obj.get("messages")) {
        let field = if obj.contains_key("conversations") {
            "conversations"
        } else {
            "messages"
        };
        prompt_messages(c, field).map_err(err)?
    } else {
        return Err(err(
            "missing field \"prompt\" (or \"conversations\"): a preference record is {prompt, chosen, rejected} or ShareGPT conversations with chosen/rejected".into(),
        ));
    };
    let prompt = with_system(obj, prompt).map_err(err)?;
    let response = |k: &str| -> Result<String, RlhfError> {
        let v = obj.get(k).ok_or_else(|| {
            err(format!(
                "missing field {k:?}: a preference record needs both \"chosen\" and \"rejected\""
            ))
        })?;
        response_text(v, k).map_err(err)
    };
    let (chosen, rejected) = (response("chosen")?, response("rejected")?);
    let margin = match obj.get("margin") {
        None | Some(Value::Null) => 0.0,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0),
        Some(other) => {
            return Err(err(format!(
                "margin must be a number, found {}",
                kind(other)
            )))
        }
    };
    Ok(PreferencePair {
        prompt,
        chosen,
        rejected,
        margin,
        origin: origin.to_string(),
    })
}

/// One prompt record.
pub fn parse_prompt(v: &Value, origin: &str) -> Result<PromptRecord, RlhfError> {
    let err = |msg: String| RlhfError::Record {
        origin: origin.to_string(),
        msg,
    };
    let Value::Object(obj) = v else {
        return Err(err(format!("expected a JSON object, found {}", kind(v))));
    };
    let field = ["prompt", "messages", "conversations", "instruction"]
        .into_iter()
        .find(|k| obj.contains_key(*k))
        .ok_or_else(|| {
            err("missing field \"prompt\" (a string or messages), \"messages\", \"conversations\" or \"instruction\"".into())
        })?;
    let prompt = if field == "instruction" {
        vec![alpaca_prompt(obj).map_err(err)?]
    } else {
        prompt_messages(&obj[field], field).map_err(err)?
    };
    let prompt = with_system(obj, prompt).map_err(err)?;
    Ok(PromptRecord {
        prompt,
        record: v.clone(),
        origin: origin.to_string(),
    })
}

/// An Alpaca record's user turn: `instruction`, then `input` after a newline when present.
fn alpaca_prompt(obj: &Map<String, Value>) -> Result<Message, String> {
    let text = |k: &str| match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(t)) => Ok(Some(t.clone())),
        Some(v) => Err(format!("\"{k}\" must be a string, found {}", kind(v))),
    };
    let instruction = text("instruction")?.unwrap_or_default();
    let content = match text("input")? {
        Some(input) if !input.is_empty() => format!("{instruction}\n{input}"),
        _ => instruction,
    };
    Ok(Message::new("user", &content))
}

/// Every preference pair of `files`, in order. With `skip_bad`, bad records are skipped and
/// counted (the count is returned).
pub fn read_preferences(
    files: &[PathBuf],
    skip_bad: bool,
) -> Result<(Vec<PreferencePair>, usize), RlhfError> {
    read_all(files, skip_bad, parse_preference)
}

/// Every prompt of `files`, in order (see [`read_preferences`] for `skip_bad`).
pub fn read_prompts(
    files: &[PathBuf],
    skip_bad: bool,
) -> Result<(Vec<PromptRecord>, usize), RlhfError> {
    read_all(files, skip_bad, parse_prompt)
}

fn read_all<T>(
    files: &[PathBuf],
    skip_bad: bool,
    parse: fn(&Value, &str) -> Result<T, RlhfError>,
) -> Result<(Vec<T>, usize), RlhfError> {
    let (mut out, mut skipped) = (Vec::new(), 0);
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| io(f, e))?;
        // JSON array or JSONL, split as SFT splits its records.
        for (locus, v) in kiln_chat::split_records(f, &text)? {
            let origin = format!("{}: {locus}", f.display());
            let parsed = v
                .map_err(|msg| RlhfError::Record {
                    origin: origin.clone(),
                    msg,
                })
                .and_then(|v| parse(&v, &origin));
            match parsed {
                Ok(x) => out.push(x),
                Err(_) if skip_bad => skipped += 1,
                Err(e) => return Err(e),
            }
        }
    }
    if out.is_empty() {
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        return Err(RlhfError::Config(format!(
            "no usable records in {}",
            names.join(", ")
        )));
    }
    Ok((out, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_common_forms() {
        let p = parse_preference(
            &json!({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "margin": 1.5}),
            "x",
        )
        .unwrap();
        assert_eq!(
            (p.prompt.len(), p.chosen.as_str(), p.margin),
            (1, "Hello!", 1.5)
        );
        let p = parse_preference(
            &json!({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}, {"from": "human", "value": "Q2"}],
                    "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}),
            "x",
        )
        .unwrap();
        assert_eq!(p.prompt.len(), 3);
        assert_eq!((p.chosen.as_str(), p.rejected.as_str()), ("good", "bad"));
        let p = parse_preference(
            &json!({"prompt": [{"role": "user", "content": "Q"}],
                    "chosen": [{"role": "assistant", "content": "c"}],
                    "rejected": [{"role": "assistant", "content": "r"}], "system": "Be brief."}),
            "x",
        )
        .unwrap();
        assert_eq!(p.prompt[0].role, "system");
        let q = parse_prompt(&json!({"prompt": "Count to 3"}), "x").unwrap();
        assert_eq!(q.user_text(), "Count to 3");
        let q = parse_prompt(
            &json!({"instruction": "Translate", "input": "Bonjour", "output": "Hello", "system": "Be brief."}),
            "x",
        )
        .unwrap();
        assert_eq!(q.prompt.len(), 2);
        assert_eq!(q.user_text(), "Translate\nBonjour");
        let q = parse_prompt(&json!({"instruction": "Count to 3", "input": ""}), "x").unwrap();
        assert_eq!(q.user_text(), "Count to 3");
    }

    #[test]
    fn bad_records_name_the_field() {
        let e = parse_preference(&json!({"prompt": "Hi", "chosen": "x"}), "f.json: record 3")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f.json: record 3") && e.contains("\"rejected\""),
            "{e}"
        );
        let e = parse_preference(
            &json!({"prompt": "Hi", "chosen": {"from": "human", "value": "x"}, "rejected": "y"}),
            "r",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("chosen must be the assistant's"), "{e}");
        let e = parse_prompt(
            &json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
            "r",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("must end with a user message"), "{e}");
        let e = parse_prompt(&json!({"instruction": 3}), "r")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"instruction\" must be a string"), "{e}");
    }
}
