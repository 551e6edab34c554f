//! Tool calls: the format a chat template asks the model to write them in, and reading them
//! back out of the reply, whole or while it streams.
//!
//! Two formats cover the templates in use:
//! * **tagged** (Hermes, Qwen2.5, SmolLM3, ...): `<tool_call>{"name": ..., "arguments": {...}}
//!   </tool_call>`, several in a row; the JSON may also be a list of calls (SmolLM2);
//! * **bare JSON** (Llama 3.x): the whole reply is `{"name": ..., "parameters": {...}}`,
//!   possibly after `<|python_tag|>`.

use serde_json::Value;

/// How the template's model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ToolFormat {
    Tagged,
    BareJson,
}

pub(crate) const OPEN: &str = "<tool_call>";
pub(crate) const CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";

impl ToolFormat {
    /// The format a chat template describes, if it renders tools at all.
    pub(crate) fn of_template(source: &str) -> Option<Self> {
        if !source.contains("tools") {
            return None;
        }
        if source.contains(OPEN) {
            Some(ToolFormat::Tagged)
        } else if source.contains("<|start_header_id|>") && source.contains("parameters") {
            Some(ToolFormat::BareJson)
        } else {
            None
        }
    }

    /// The key the model writes the arguments under.
    pub(crate) fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Tagged => "arguments",
            ToolFormat::BareJson => "parameters",
        }
    }

    /// The tags around one call (for constrained decoding), as the templates show them.
    pub(crate) fn tags(self) -> Option<(&'static str, &'static str)> {
        match self {
            ToolFormat::Tagged => Some(("<tool_call>\n", "\n</tool_call>")),
            ToolFormat::BareJson => None,
        }
    }
}

/// One call read from a reply.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToolCall {
    pub name: String,
    /// The arguments as a JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// Calls in one JSON value: an object `{"name", "arguments"|"parameters"}` or a list of them.
fn calls_in(v: &Value) -> Option<Vec<ToolCall>> {
    match v {
        Value::Array(items) => items.iter().map(one_call).collect(),
        other => one_call(other).map(|c| vec![c]),
    }
}

fn one_call(v: &Value) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or(Value::Object(Default::default()));
    let arguments = match args {
        // Some models write the arguments as a JSON string already.
        Value::String(s) if serde_json::from_str::<Value>(&s).is_ok() => s,
        other => other.to_string(),
    };
    Some(ToolCall { name, arguments })
}

/// What a stream of reply text turns into.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Piece {
    Content(String),
    Call(ToolCall),
}

/// Reads tool calls out of reply text as it arrives: text that might start a call is held
/// back until it is known, a call is given whole once its closing tag (or the end) arrives.
///
/// Small models often drop the tags and answer with the bare JSON of a call, so in either
/// format a reply that starts with `{` is held to the end and read as a call when it is one
/// of an offered tool (`names`); otherwise it is text.
pub(crate) struct ToolStream {
    format: ToolFormat,
    names: Vec<String>,
    /// Holding a reply that started with `{` (or `<|python_tag|>`).
    bare: bool,
    /// Text not given out yet.
    pending: String,
    /// Inside `<tool_call>` (tagged), or holding a reply that may be a bare JSON call.
    in_call: bool,
    /// Whether any non-whitespace text has been seen (a bare JSON call must come first).
    started: bool,
    pub calls: usize,
}

impl ToolStream {
    pub(crate) fn new(format: ToolFormat, names: Vec<String>) -> Self {
        Self {
            format,
            names,
            bare: false,
            pending: String::new(),
            in_call: false,
            started: false,
            calls: 0,
        }
    }

    pub(crate) fn push(&mut self, text: &str) -> Vec<Piece> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        if !self.started {
            let t = self.pending.trim_start();
            if t.is_empty() {
                return out;
            }
            self.started = true;
            self.bare =
                t.starts_with('{') || t.starts_with(PYTHON_TAG) || PYTHON_TAG.starts_with(t);
        }
        if self.bare {
            return out; // read at the end
        }
        match self.format {
            ToolFormat::Tagged => self.drain_tagged(&mut out),
            ToolFormat::BareJson => {
                if !self.pending.is_empty() {
                    out.push(Piece::Content(std::mem::take(&mut self.pending)));
                }
            }
        }
        out
    }

    fn drain_tagged(&mut self, out: &mut Vec<Piece>) {
        loop {
            if self.in_call {
                let Some(end) = self.pending.find(CLOSE) else {
                    return;
                };
                let body = self.pending[..end].to_string();
                self.pending.drain(..end + CLOSE.len());
                self.in_call = false;
                self.emit_calls(&body, out, true);
                continue;
            }
            if let Some(start) = self.pending.find(OPEN) {
                let before = self.pending[..start].to_string();
                if !before.trim().is_empty() || (self.calls == 0 && !before.is_empty()) {
                    out.push(Piece::Content(before));
                }
                self.pending.drain(..start + OPEN.len());
                self.in_call = true;
                continue;
            }
            // Hold back a tail that could be the start of `<tool_call>`.
            let keep = (1..OPEN.len())
                .rev()
                .find(|&k| self.pending.ends_with(&OPEN[..k]))
                .unwrap_or(0);
            let cut = self.pending.len() - keep;
            if cut > 0 {
                let text: String = self.pending.drain(..cut).collect();
                // Whitespace between calls is not content.
                if !(self.calls > 0 && text.trim().is_empty()) {
                    out.push(Piece::Content(text));
                }
            }
            return;
        }
    }

    /// Parses a call body; text that is not a call is given back as content. A bare reply
    /// counts only when every call names an offered tool.
    fn emit_calls(&mut self, body: &str, out: &mut Vec<Piece>, tagged: bool) {
        let trimmed = body.trim().trim_start_matches(PYTHON_TAG).trim();
        let known =
            |calls: &[ToolCall]| tagged || calls.iter().all(|c| self.names.contains(&c.name));
        match serde_json::from_str::<Value>(trimmed)
            .ok()
            .and_then(|v| calls_in(&v))
        {
            Some(calls) if !calls.is_empty() && known(&calls) => {
                self.calls += calls.len();
                out.extend(calls.into_iter().map(Piece::Call));
            }
            _ => {
                let text = if tagged {
                    format!("{OPEN}{body}{CLOSE}")
                } else {
                    body.to_string()
                };
                out.push(Piece::Content(text));
            }
        }
    }

    /// The end of the reply: whatever is held back.
    pub(crate) fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.pending);
        if self.bare {
            self.emit_calls(&rest, &mut out, false);
        } else if self.in_call {
            // A tagged call whose closing tag never came.
            self.emit_calls(&rest, &mut out, true);
            if let Some(Piece::Content(t)) = out.last_mut() {
                // Given back as written: without the closing tag.
                if let Some(stripped) = t.strip_suffix(CLOSE) {
                    *t = stripped.to_string();
                }
            }
        } else if !rest.is_empty() {
            // Whitespace after the last call is not content.
            if self.calls > 0 && rest.trim().is_empty() {
                return out;
            }
            out.push(Piece::Content(rest));
        }
        out
    }
}

/// A whole reply: its content (without the calls) and its calls.
pub(crate) fn parse_reply(
    format: ToolFormat,
    names: &[String],
    text: &str,
) -> (String, Vec<ToolCall>) {
    let mut s = ToolStream::new(format, names.to_vec());
    let mut pieces = s.push(text);
    pieces.extend(s.finish());
    let mut content = String::new();
    let mut calls = Vec::new();
    for p in pieces {
        match p {
            Piece::Content(t) => content.push_str(&t),
            Piece::Call(c) => calls.push(c),
        }
    }
    (content, calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &str) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments: args.into(),
        }
    }

    #[test]
    fn tagged_calls_are_read_whole_and_streamed() {
        let reply = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        let (content, calls) = parse_reply(ToolFormat::Tagged, &[], reply);
        assert_eq!(content, "Let me check.\n");
        assert_eq!(
            calls,
            vec![
                call("get_weather", r#"{"city":"Paris"}"#),
                call("get_time", "{}")
            ]
        );
        // Streamed one character at a time: the same pieces, and no tag ever leaks as text.
        let mut s = ToolStream::new(ToolFormat::Tagged, vec![]);
        let mut pieces = Vec::new();
        for ch in reply.chars() {
            pieces.extend(s.push(&ch.to_string()));
        }
        pieces.extend(s.finish());
        let text: String = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Content(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(text, "Let me check.\n");
        assert_eq!(
            pieces
                .iter()
                .filter(|p| matches!(p, Piece::Call(_)))
                .count(),
            2
        );
    }

    #[test]
    fn other_shapes_and_plain_text() {
        // SmolLM2's list form, and arguments given as a string.
        let (_, calls) = parse_reply(
            ToolFormat::Tagged,
            &[],
            r#"<tool_call>[{"name": "a", "arguments": "{\"x\": 1}"}, {"name": "b", "arguments": {}}]</tool_call>"#,
        );
        assert_eq!(calls, vec![call("a", r#"{"x": 1}"#), call("b", "{}")]);
        // Text with a `<` that is not a call, and a broken call, stay text.
        let (content, calls) = parse_reply(
            ToolFormat::Tagged,
            &[],
            "1 < 2 and <tool_call>oops</tool_call>",
        );
        assert!(calls.is_empty());
        assert_eq!(content, "1 < 2 and <tool_call>oops</tool_call>");
        // Llama 3: a bare JSON reply is a call; other replies are text.
        let f = ["f".to_string()];
        let (c, calls) = parse_reply(
            ToolFormat::BareJson,
            &f,
            r#"<|python_tag|>{"name": "f", "parameters": {"q": "x"}}"#,
        );
        assert_eq!((c.as_str(), calls), ("", vec![call("f", r#"{"q":"x"}"#)]));
        let (c, calls) = parse_reply(ToolFormat::BareJson, &f, "Hello {there}");
        assert_eq!((c.as_str(), calls.len()), ("Hello {there}", 0));
        // A bare call in the tagged format counts when it names an offered tool; other JSON
        // answers stay text.
        let (_, calls) = parse_reply(ToolFormat::Tagged, &f, r#"{"name": "f", "arguments": {}}"#);
        assert_eq!(calls, vec![call("f", "{}")]);
        let json_answer = r#"{"name": "Ann", "age": 3}"#;
        let (c, calls) = parse_reply(ToolFormat::Tagged, &f, json_answer);
        assert_eq!((c.as_str(), calls.len()), (json_answer, 0));
    }

    #[test]
    fn formats_come_from_the_template() {
        assert_eq!(
            ToolFormat::of_template("{% if tools %}<tool_call>{% endif %}"),
            Some(ToolFormat::Tagged)
        );
        assert_eq!(
            ToolFormat::of_template("{% if tools %}<|start_header_id|>parameters{% endif %}"),
            Some(ToolFormat::BareJson)
        );
        assert_eq!(ToolFormat::of_template("{{ messages }}"), None);
    }
}
