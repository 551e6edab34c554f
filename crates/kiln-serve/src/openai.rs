//! The OpenAI request bodies kiln accepts, their validation, and the error shape.
//!
//! Fields are parsed with their JSON path, so a wrong type names the parameter
//! (`messages[2].content`). Fields kiln does not act on but that change nothing (`user`,
//! `metadata`, `store`, ...) are ignored as OpenAI does; fields that would change the output
//! and that kiln cannot honour are refused with 400 naming them, never silently dropped.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// A parameter with a value kiln does not accept.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::bad_request(Some(param), message);
        e.code = Some("invalid_value");
        e
    }

    pub fn unsupported(param: &str, what: &str) -> Self {
        let mut e = Self::bad_request(
            Some(param),
            format!("`{param}`: {what} is not supported by this server"),
        );
        e.code = Some("unsupported_parameter");
        e
    }

    pub fn context_length(prompt: usize, max_tokens: Option<usize>, ctx: usize) -> Self {
        let message = match max_tokens {
            Some(m) => format!(
                "this model's context is {ctx} tokens; the prompt has {prompt} and max_tokens asks for {m} more ({} in all): shorten the prompt or lower max_tokens",
                prompt + m
            ),
            None => format!(
                "this model's context is {ctx} tokens and the prompt has {prompt}: shorten the prompt"
            ),
        };
        Self {
            status: StatusCode::BAD_REQUEST,
            message,
            kind: "invalid_request_error",
            param: Some("messages".into()),
            code: Some("context_length_exceeded"),
        }
    }

    pub fn model_not_found(model: &str, available: &[String]) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "the model `{model}` does not exist on this server; it serves {}",
                available.join(", ")
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or incorrect API key: send `Authorization: Bearer KEY`".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    pub fn forbidden(message: &str) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("forbidden"),
        }
    }

    pub fn busy(message: String) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message,
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
        }
    }

    pub fn not_found(path: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("no such endpoint: {path}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"),
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("the request body is larger than {limit} bytes (--max-body)"),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        }
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("{path} does not take {method}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("method_not_allowed"),
        }
    }

    pub fn loading() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the model is still loading; retry in a moment".into(),
            kind: "server_error",
            param: None,
            code: Some("model_loading"),
        }
    }

    pub fn timeout(seconds: f64) -> Self {
        Self {
            status: StatusCode::GATEWAY_TIMEOUT,
            message: format!("the request took longer than {seconds} s (--request-timeout)"),
            kind: "server_error",
            param: None,
            code: Some("timeout"),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Parses a request body as JSON (a syntax error names no parameter).
pub fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ApiError::bad_request(None, "the request body is not valid UTF-8"))?;
    let v: Value = serde_json::from_str(text).map_err(|e| {
        ApiError::bad_request(None, format!("the request body is not valid JSON: {e}"))
    })?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            None,
            "the request body must be a JSON object",
        ));
    }
    Ok(v)
}

/// Reads `T` out of a parsed body, naming the parameter at fault.
pub fn from_body<T: serde::de::DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            // A missing field: serde names it in the message.
            let msg = inner.to_string();
            let param = msg
                .strip_prefix("missing field `")
                .and_then(|m| m.split('`').next())
                .map(str::to_string);
            let mut err = ApiError::bad_request(param.as_deref(), format!("the request {msg}"));
            err.code = Some("missing_required_parameter");
            err
        } else {
            ApiError::invalid(&path, format!("`{path}`: {inner}"))
        }
    })
}

/// `stop`: one string or up to four.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Result<Vec<String>, ApiError> {
        let v = match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        };
        if v.len() > 4 {
            return Err(ApiError::invalid(
                "stop",
                format!("`stop` takes at most 4 strings, got {}", v.len()),
            ));
        }
        if v.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop",
                "`stop` strings must not be empty",
            ));
        }
        Ok(v)
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by chat and completions (read from the same body).
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    pub stop: Option<Stop>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// A string or an array of content parts (read in `routes::chat_messages`).
    pub content: Option<Value>,
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub response_format: Option<Value>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
}

/// `prompt` of a completion: a string or an array holding one string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    pub logprobs: Option<i64>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
}

/// `input` of an embeddings request: one text or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    pub encoding_format: Option<String>,
    pub dimensions: Option<i64>,
}

/// Checks an integer parameter's range.
pub fn int_in(param: &str, v: i64, lo: i64, hi: i64) -> Result<usize, ApiError> {
    if v < lo || v > hi {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(v as usize)
}

/// Checks a float parameter's range.
pub fn float_in(param: &str, v: f64, lo: f64, hi: f64) -> Result<f64, ApiError> {
    if !(v >= lo && v <= hi) {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(v)
}

impl SamplingFields {
    /// The sampler settings, checked: each field given, else the model's
    /// `generation_config.json`, else OpenAI's default. A request without `seed` samples
    /// differently every time.
    pub fn params(
        &self,
        model: &kiln_load::GenerationDefaults,
    ) -> Result<kiln_infer::SamplingParams, ApiError> {
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::unsupported("logit_bias", "a logit bias"));
        }
        let temperature = float_in(
            "temperature",
            self.temperature.or(model.temperature).unwrap_or(1.0),
            0.0,
            2.0,
        )?;
        Ok(kiln_infer::SamplingParams {
            temperature,
            top_p: match self.top_p {
                Some(p) if p <= 0.0 => {
                    return Err(ApiError::invalid("top_p", "`top_p` must be in (0, 1]"))
                }
                Some(p) => float_in("top_p", p, 0.0, 1.0)?,
                None => model.top_p.unwrap_or(1.0),
            },
            top_k: match self.top_k {
                // vLLM's convention: -1 (or 0) turns top-k off.
                Some(k) if k <= 0 => 0,
                Some(k) => int_in("top_k", k, 1, i64::from(u32::MAX))?,
                None => model.top_k.unwrap_or(0),
            },
            min_p: float_in("min_p", self.min_p.or(model.min_p).unwrap_or(0.0), 0.0, 1.0)?,
            repetition_penalty: float_in(
                "repetition_penalty",
                self.repetition_penalty
                    .or(model.repetition_penalty)
                    .unwrap_or(1.0),
                f64::MIN_POSITIVE,
                100.0,
            )?,
            frequency_penalty: float_in(
                "frequency_penalty",
                self.frequency_penalty.unwrap_or(0.0),
                -2.0,
                2.0,
            )?,
            presence_penalty: float_in(
                "presence_penalty",
                self.presence_penalty.unwrap_or(0.0),
                -2.0,
                2.0,
            )?,
            seed: match self.seed {
                Some(s) => s as u64,
                None => kiln_infer::fresh_seed(),
            },
        })
    }

    pub fn n(&self, max_batch: usize) -> Result<usize, ApiError> {
        int_in("n", self.n.unwrap_or(1), 1, max_batch as i64)
    }
}
