//! Two more request shapes onto the same engine: OpenAI's Responses API (`POST
//! /v1/responses`, text in and out) and Anthropic's Messages API (`POST /v1/messages`). Each
//! turns its body into chat messages and sampling settings, runs them like a chat completion
//! with one choice, and writes the answer (or its stream of events) in its own format.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_infer::FinishReason;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::Event;
use crate::openai::{float_in, from_body, int_in, parse_json, ApiError};
use crate::routes::{
    budget, chat_prompt, check_model, gather, new_id, ready, respond, sse_response, submit,
    unix_now, Job,
};
use crate::{AppState, Ready};

/// The text of a content field: a string, or an array of text blocks (`text`,
/// `input_text`, `output_text`).
fn text_of(v: &Value, param: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut out = String::new();
            for (j, b) in blocks.iter().enumerate() {
                let kind = b.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, b.get("text").and_then(Value::as_str)) {
                    ("text" | "input_text" | "output_text", Some(t)) => out.push_str(t),
                    _ => {
                        return Err(ApiError::unsupported(
                            &format!("{param}[{j}]"),
                            &format!("a content block of type {kind:?}"),
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::invalid(
            param,
            format!("`{param}` must be a string or an array of text blocks"),
        )),
    }
}

/// Sampling settings both APIs share.
#[derive(Debug, Default, Deserialize)]
struct Sampling {
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<i64>,
}

impl Sampling {
    /// Each field given, else the model's generation defaults, else 1.0 / off.
    fn params(
        &self,
        max_temperature: f64,
        model: &kiln_load::GenerationDefaults,
    ) -> Result<kiln_infer::SamplingParams, ApiError> {
        Ok(kiln_infer::SamplingParams {
            temperature: float_in(
                "temperature",
                // The model's default is kept within this API's range; a value the client
                // sends is checked.
                self.temperature
                    .unwrap_or_else(|| model.temperature.unwrap_or(1.0).min(max_temperature)),
                0.0,
                max_temperature,
            )?,
            top_p: match self.top_p {
                Some(p) => float_in("top_p", p, f64::MIN_POSITIVE, 1.0)?,
                None => model.top_p.unwrap_or(1.0),
            },
            top_k: match self.top_k {
                Some(k) if k > 0 => int_in("top_k", k, 1, i64::from(u32::MAX))?,
                Some(_) => 0,
                None => model.top_k.unwrap_or(0),
            },
            min_p: model.min_p.unwrap_or(0.0),
            repetition_penalty: model.repetition_penalty.unwrap_or(1.0),
            seed: self.seed.map_or_else(kiln_infer::fresh_seed, |s| s as u64),
            ..kiln_infer::SamplingParams::default()
        })
    }
}

/// Runs one conversation; returns the event stream and the prompt's length.
#[allow(clippy::too_many_arguments)] // one conversation's settings, as the two APIs give them
fn start(
    st: &AppState,
    r: &Ready,
    adapter: u16,
    messages: Value,
    params: kiln_infer::SamplingParams,
    max_tokens: Option<i64>,
    max_param: &str,
    stop: Vec<String>,
) -> Result<(mpsc::UnboundedReceiver<Event>, usize), ApiError> {
    let prompt = chat_prompt(r, &messages, None)?;
    let max_tokens = budget(prompt.len(), max_tokens, max_param, r.ctx)?;
    let prompt_tokens = prompt.len();
    let rx = submit(
        st,
        r,
        Job {
            prompt,
            n: 1,
            params,
            max_tokens,
            stop,
            logprobs: None,
            constraint: None,
            keep_special: false,
            adapter,
        },
    )?;
    Ok((rx, prompt_tokens))
}

/// Streams events written by `write` for each scheduler event until the answer is done.
fn spawn_events(
    st: &Arc<AppState>,
    mut rx: mpsc::UnboundedReceiver<Event>,
    mut write: impl FnMut(Event) -> Vec<SseEvent> + Send + 'static,
    first: Vec<SseEvent>,
) -> Response {
    let (tx, out) = mpsc::channel(64);
    let timeout = st.cfg.request_timeout;
    tokio::spawn(async move {
        for e in first {
            if tx.send(e).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ev = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(ev)) => ev,
                _ => return,
            };
            let last = matches!(ev, Event::Done { .. } | Event::Failed(_));
            for e in write(ev) {
                if tx.send(e).await.is_err() {
                    return; // the client went away; dropping `rx` cancels the request
                }
            }
            if last {
                return;
            }
        }
    });
    sse_response(out)
}

fn named(event: &str, v: &Value) -> SseEvent {
    SseEvent::default().event(event).data(v.to_string())
}

// ---------------------------------------------------------------------------------------------
// POST /v1/responses

#[derive(Debug, Deserialize)]
struct ResponsesRequest {
    model: String,
    input: Value,
    instructions: Option<String>,
    max_output_tokens: Option<i64>,
    #[serde(default)]
    stream: bool,
    tools: Option<Vec<Value>>,
    text: Option<Value>,
    previous_response_id: Option<String>,
}

pub async fn responses(State(st): State<Arc<AppState>>, req: Request) -> Response {
    respond(
        st,
        req,
        |st, body| async move { responses_inner(&st, &body).await },
        IntoResponse::into_response,
    )
    .await
}

async fn responses_inner(st: &Arc<AppState>, body: &[u8]) -> Result<Response, ApiError> {
    let body = parse_json(body)?;
    let req: ResponsesRequest = from_body(&body)?;
    let sampling: Sampling = from_body(&body)?;
    let r = ready(st)?;
    let adapter = check_model(st, &req.model)?;
    crate::routes::engine(r)?;
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::unsupported(
            "tools",
            "tools on /v1/responses (use /v1/chat/completions)",
        ));
    }
    if req.previous_response_id.is_some() {
        return Err(ApiError::unsupported(
            "previous_response_id",
            "stored responses",
        ));
    }
    if req
        .text
        .as_ref()
        .and_then(|t| t.get("format"))
        .and_then(|f| f.get("type"))
        .is_some_and(|t| t != "text")
    {
        return Err(ApiError::unsupported(
            "text.format",
            "structured output on /v1/responses (use /v1/chat/completions)",
        ));
    }
    let mut messages = Vec::new();
    if let Some(i) = &req.instructions {
        messages.push(json!({"role": "system", "content": i}));
    }
    match &req.input {
        Value::String(s) => messages.push(json!({"role": "user", "content": s})),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let param = format!("input[{i}]");
                let role = item.get("role").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::unsupported(&param, "input items other than messages")
                })?;
                let role = match role {
                    "developer" => "system",
                    r @ ("system" | "user" | "assistant") => r,
                    other => {
                        return Err(ApiError::invalid(
                            &format!("{param}.role"),
                            format!("unknown role {other:?}"),
                        ))
                    }
                };
                let content = text_of(
                    item.get("content").unwrap_or(&Value::Null),
                    &format!("{param}.content"),
                )?;
                messages.push(json!({"role": role, "content": content}));
            }
        }
        _ => {
            return Err(ApiError::invalid(
                "input",
                "`input` must be a string or an array of messages",
            ))
        }
    }
    let (rx, prompt_tokens) = start(
        st,
        r,
        adapter,
        Value::Array(messages),
        sampling.params(2.0, &r.generation)?,
        req.max_output_tokens,
        "max_output_tokens",
        Vec::new(),
    )?;
    let id = new_id("resp");
    let msg_id = new_id("msg");
    let created = unix_now();
    let model = req.model.clone();
    let response =
        move |status: &str, text: &str, output_tokens: usize, finish: Option<FinishReason>| {
            let incomplete = finish
                .filter(|f| f.openai_name() == "length")
                .map(|_| json!({"reason": "max_output_tokens"}));
            let status = if incomplete.is_some() {
                "incomplete"
            } else {
                status
            };
            let output = if status == "in_progress" {
                json!([])
            } else {
                json!([{"type": "message", "id": msg_id, "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}])
            };
            json!({
                "id": id, "object": "response", "created_at": created, "status": status,
                "model": model, "output": output, "incomplete_details": incomplete,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": output_tokens,
                          "total_tokens": prompt_tokens + output_tokens},
            })
        };
    if !req.stream {
        let o = gather(st, rx, 1).await?;
        let c = &o.choices[0];
        return Ok(Json(response("completed", &c.text, c.tokens.len(), c.finish)).into_response());
    }
    // Events as OpenAI sends them, each with its type and a sequence number.
    let mut seq = 0u64;
    let mut event = move |kind: &str, mut v: Value| {
        v["type"] = json!(kind);
        v["sequence_number"] = json!(seq);
        seq += 1;
        named(kind, &v)
    };
    let item_id = new_id("msg");
    let mut text = String::new();
    let mut tokens = 0;
    let first = vec![
        event(
            "response.created",
            json!({"response": response("in_progress", "", 0, None)}),
        ),
        event(
            "response.output_item.added",
            json!({"output_index": 0,
            "item": {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []}}),
        ),
        event(
            "response.content_part.added",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": []}}),
        ),
    ];
    let write = move |ev: Event| -> Vec<SseEvent> {
        match ev {
            Event::Delta {
                text: t, tokens: n, ..
            } => {
                tokens += n.len();
                if t.is_empty() {
                    return Vec::new();
                }
                text.push_str(&t);
                vec![event(
                    "response.output_text.delta",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": t}),
                )]
            }
            Event::Done { finish, .. } => vec![
                event(
                    "response.output_text.done",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text}),
                ),
                event(
                    "response.content_part.done",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                    "part": {"type": "output_text", "text": text, "annotations": []}}),
                ),
                event(
                    "response.output_item.done",
                    json!({"output_index": 0,
                    "item": {"type": "message", "id": item_id, "status": "completed", "role": "assistant",
                             "content": [{"type": "output_text", "text": text, "annotations": []}]}}),
                ),
                event(
                    "response.completed",
                    json!({"response": response("completed", &text, tokens, Some(finish))}),
                ),
            ],
            Event::Failed(m) => vec![event("error", json!({"message": m}))],
            Event::Prefilled { .. } => Vec::new(),
        }
    };
    Ok(spawn_events(st, rx, write, first))
}

// ---------------------------------------------------------------------------------------------
// POST /v1/messages (Anthropic)

#[derive(Debug, Deserialize)]
struct MessagesRequest {
    model: String,
    messages: Vec<AnthropicMessage>,
    max_tokens: i64,
    system: Option<Value>,
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    stream: bool,
    tools: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
struct AnthropicMessage {
    role: String,
    content: Value,
}

/// An error in Anthropic's shape: `{"type": "error", "error": {"type", "message"}}`.
fn anthropic_error(e: ApiError) -> Response {
    let kind = match e.status {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        s if s.is_server_error() => "api_error",
        _ => "invalid_request_error",
    };
    (
        e.status,
        Json(json!({"type": "error", "error": {"type": kind, "message": e.message}})),
    )
        .into_response()
}

pub async fn messages(State(st): State<Arc<AppState>>, req: Request) -> Response {
    respond(
        st,
        req,
        |st, body| async move { messages_inner(&st, &body).await },
        anthropic_error,
    )
    .await
}

/// Anthropic's stop reasons.
fn stop_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::StopToken => "end_turn",
        FinishReason::StopString => "stop_sequence",
        FinishReason::MaxTokens | FinishReason::ContextFull => "max_tokens",
    }
}

async fn messages_inner(st: &Arc<AppState>, body: &[u8]) -> Result<Response, ApiError> {
    let body = parse_json(body)?;
    let req: MessagesRequest = from_body(&body)?;
    let sampling: Sampling = from_body(&body)?;
    let r = ready(st)?;
    let adapter = check_model(st, &req.model)?;
    crate::routes::engine(r)?;
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::unsupported(
            "tools",
            "tools on /v1/messages (use /v1/chat/completions)",
        ));
    }
    let mut messages = Vec::new();
    if let Some(s) = &req.system {
        messages.push(json!({"role": "system", "content": text_of(s, "system")?}));
    }
    for (i, m) in req.messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "user" | "assistant") {
            return Err(ApiError::invalid(
                &format!("messages[{i}].role"),
                format!(
                    "`messages[{i}].role` must be user or assistant, got {:?}",
                    m.role
                ),
            ));
        }
        let content = text_of(&m.content, &format!("messages[{i}].content"))?;
        messages.push(json!({"role": m.role, "content": content}));
    }
    if messages.iter().all(|m| m["role"] == "system") {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    let stop = req.stop_sequences.clone().unwrap_or_default();
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop_sequences",
            "`stop_sequences` must not hold empty strings",
        ));
    }
    // Anthropic's temperature runs from 0 to 1.
    let (rx, prompt_tokens) = start(
        st,
        r,
        adapter,
        Value::Array(messages),
        sampling.params(1.0, &r.generation)?,
        Some(req.max_tokens),
        "max_tokens",
        stop,
    )?;
    let id = new_id("msg");
    let model = req.model.clone();
    if !req.stream {
        let o = gather(st, rx, 1).await?;
        let c = &o.choices[0];
        let finish = c.finish.unwrap_or(FinishReason::MaxTokens);
        return Ok(Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": c.text}],
            "stop_reason": stop_reason(finish), "stop_sequence": c.stop,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": c.tokens.len()},
        }))
        .into_response());
    }
    let first = vec![
        named(
            "message_start",
            &json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}}),
        ),
        named(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    let mut tokens = 0;
    let write = move |ev: Event| -> Vec<SseEvent> {
        match ev {
            Event::Delta {
                text, tokens: n, ..
            } => {
                tokens += n.len();
                if text.is_empty() {
                    return Vec::new();
                }
                vec![named(
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": text}}),
                )]
            }
            Event::Done { finish, stop, .. } => vec![
                named(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": 0}),
                ),
                named(
                    "message_delta",
                    &json!({"type": "message_delta",
                    "delta": {"stop_reason": stop_reason(finish), "stop_sequence": stop},
                    "usage": {"output_tokens": tokens}}),
                ),
                named("message_stop", &json!({"type": "message_stop"})),
            ],
            Event::Failed(m) => vec![named(
                "error",
                &json!({"type": "error",
                "error": {"type": "api_error", "message": m}}),
            )],
            Event::Prefilled { .. } => Vec::new(),
        }
    };
    Ok(spawn_events(st, rx, write, first))
}
