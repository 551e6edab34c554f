//! kiln-serve: any model kiln loads, over the OpenAI HTTP API.
//!
//! * [`engine`]: the scheduler thread: continuous batching over KV-cache slots, chunked
//!   prefill, prefix reuse, cancellation;
//! * `routes`: `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/models`,
//!   `/health`, `/metrics` and a chat page at `/`; `translate`: `/v1/responses` and
//!   `/v1/messages` (Anthropic's) onto the same engine; `tools`: tool-call formats;
//! * [`openai`]: request bodies, their validation and OpenAI's error shape;
//! * [`json`]: structured output, a JSON automaton that masks the tokens which cannot
//!   continue a valid value.
//!
//! The model loads in the background: `/health` answers 503 until it is ready.

pub mod engine;
pub mod json;
pub mod metrics;
pub mod openai;
mod routes;
mod tools;
mod translate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use kiln_data::ModelTokenizer;
use kiln_infer::ChatTemplate;
use kiln_load::Weights;
use kiln_model::sentence::{is_sentence_transformers_dir, SentenceEncoder};

use crate::engine::{EngineConfig, EngineHandle};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("refusing to listen on {0} without an API key: anyone who can reach it could use the model. Pass --api-key KEY (or --api-key-file FILE), or listen on 127.0.0.1")]
    NoKeyOffLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("loading the model: {0}")]
    Load(String),
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
}

/// Everything `kiln serve` is started with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// A kiln run or checkpoint, an HF directory or a GGUF file.
    pub model: PathBuf,
    pub weights: Weights,
    /// The model id clients use (default: the file or directory stem).
    pub name: Option<String>,
    pub addr: SocketAddr,
    pub api_key: Option<String>,
    pub max_batch: usize,
    pub max_queue: usize,
    /// Context per sequence (default and at most: the model's).
    pub ctx: Option<usize>,
    pub prefill_chunk: usize,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// PEFT LoRA adapters served next to the base, by model id: requests name one as their
    /// `model`.
    pub adapters: Vec<(String, PathBuf)>,
    /// Where `POST /v1/adapters` loads adapters from, by name (none: the endpoint is off).
    pub adapter_dir: Option<PathBuf>,
    /// `/v1/embeddings` on a decoder: pooled final hidden states (none: refused).
    pub embeddings: Option<Pooling>,
}

/// How a decoder's hidden states become one embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over the text's positions.
    Mean,
    /// The last position's.
    Last,
}

impl ServeConfig {
    pub fn new(model: PathBuf) -> Self {
        Self {
            model,
            weights: Weights::default(),
            name: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: None,
            max_batch: 16,
            max_queue: 64,
            ctx: None,
            prefill_chunk: 256,
            max_body_bytes: 4 << 20,
            request_timeout: Duration::from_secs(600),
            adapters: Vec::new(),
            adapter_dir: None,
            embeddings: None,
        }
    }

    fn model_id(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        let p = self.model.as_path();
        let stem = if p.is_dir() {
            p.file_name()
        } else {
            p.file_stem()
        };
        stem.map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    }

    fn check(&self) -> Result<(), ServeError> {
        if !self.addr.ip().is_loopback() && self.api_key.is_none() {
            return Err(ServeError::NoKeyOffLoopback(self.addr));
        }
        if self.api_key.as_ref().is_some_and(|k| k.is_empty()) {
            return Err(ServeError::Config("the API key is empty".into()));
        }
        let base = self.model_id();
        for (i, (name, _)) in self.adapters.iter().enumerate() {
            if !valid_adapter_name(name) {
                return Err(ServeError::Config(format!(
                    "--adapter {name:?}: an adapter name is letters, digits, '.', '_' and '-'"
                )));
            }
            if *name == base || self.adapters[..i].iter().any(|(n, _)| n == name) {
                return Err(ServeError::Config(format!(
                    "--adapter {name}: the name is already taken"
                )));
            }
        }
        for (what, v) in [
            ("--max-batch", self.max_batch),
            ("--max-queue", self.max_queue),
            ("--prefill-chunk", self.prefill_chunk),
        ] {
            if v == 0 {
                return Err(ServeError::Config(format!("{what} must be at least 1")));
            }
        }
        Ok(())
    }
}

/// What exists once the model has loaded.
pub(crate) struct Ready {
    /// The generation scheduler (`None` for an embedding model).
    pub engine: Option<EngineHandle>,
    /// A sentence-transformers encoder (EmbeddingGemma) for `/v1/embeddings`.
    pub embedder: Option<Arc<SentenceEncoder>>,
    pub tokenizer: Arc<ModelTokenizer>,
    pub template: Option<ChatTemplate>,
    /// Context per sequence.
    pub ctx: usize,
    /// The model's configuration (adapters are checked against it).
    pub config: Option<kiln_model::ModelConfig>,
    /// The base's norm fingerprint: adapters kiln trained on another base are refused.
    pub base_fingerprint: Vec<f32>,
    /// Sampling defaults from the model's `generation_config.json`.
    pub generation: kiln_load::GenerationDefaults,
    /// How the chat template has the model write tool calls, if it does.
    pub tool_format: Option<tools::ToolFormat>,
    /// Token texts for structured output, built on first use.
    pub token_bytes: OnceLock<Arc<json::TokenBytes>>,
}

impl Ready {
    pub fn token_bytes(&self) -> Arc<json::TokenBytes> {
        self.token_bytes
            .get_or_init(|| {
                Arc::new(json::TokenBytes::new(
                    &self.tokenizer.tokenizer,
                    &self.tokenizer.stop_ids,
                ))
            })
            .clone()
    }
}

pub(crate) struct AppState {
    pub cfg: ServeConfig,
    pub model_id: String,
    /// Served adapters: model id and adapter id, in the order they were added.
    pub adapters: std::sync::RwLock<Vec<(String, u16)>>,
    pub ready: OnceLock<Ready>,
    pub metrics: Arc<Metrics>,
    pub started: u64,
}

impl AppState {
    /// The base model's id, then each adapter's.
    pub fn model_ids(&self) -> Vec<String> {
        let mut ids = vec![self.model_id.clone()];
        ids.extend(
            self.adapters
                .read()
                .expect("adapters lock")
                .iter()
                .map(|(n, _)| n.clone()),
        );
        ids
    }

    /// The adapter a request's `model` names: 0 for the base, `None` for an unknown id.
    pub fn adapter_of(&self, model: &str) -> Option<u16> {
        if model == self.model_id {
            return Some(0);
        }
        self.adapters
            .read()
            .expect("adapters lock")
            .iter()
            .find(|(n, _)| n == model)
            .map(|(_, id)| *id)
    }
}

/// An adapter name: what may name a model id and a directory under `--adapter-dir` (no path
/// separators, no `..`).
pub(crate) fn valid_adapter_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Compares two byte strings in time independent of where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    // Lengths are not secret (a key's length is not worth hiding); contents are.
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// A server bound to its address, not yet serving.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
}

impl Server {
    /// Checks the configuration and binds the address (port 0 picks a free one).
    pub async fn bind(cfg: ServeConfig) -> Result<Self, ServeError> {
        cfg.check()?;
        let listener = tokio::net::TcpListener::bind(cfg.addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: cfg.addr,
                source,
            })?;
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let state = Arc::new(AppState {
            model_id: cfg.model_id(),
            adapters: std::sync::RwLock::new(Vec::new()),
            cfg,
            ready: OnceLock::new(),
            metrics: Arc::new(Metrics::default()),
            started,
        });
        Ok(Self { listener, state })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn model_id(&self) -> &str {
        &self.state.model_id
    }

    /// Loads the model in the background and serves until `shutdown` resolves; a model that
    /// fails to load stops the server with the error.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let state = self.state.clone();
        let app = router(state.clone());
        let (load_failed_tx, load_failed_rx) = tokio::sync::oneshot::channel::<String>();
        let loader_state = state.clone();
        let loading = tokio::task::spawn_blocking(move || load(&loader_state));
        tokio::spawn(async move {
            match loading.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = load_failed_tx.send(e.to_string());
                }
                Err(e) => {
                    let _ = load_failed_tx.send(format!("the loading task failed: {e}"));
                }
            }
        });
        let load_error = Arc::new(std::sync::Mutex::new(None::<String>));
        let le = load_error.clone();
        let stop = async move {
            tokio::select! {
                _ = shutdown => {}
                Ok(msg) = load_failed_rx => { *le.lock().expect("load error") = Some(msg); }
            }
        };
        axum::serve(self.listener, app)
            .with_graceful_shutdown(stop)
            .await
            .map_err(ServeError::Http)?;
        if let Some(engine) = state.ready.get().and_then(|r| r.engine.as_ref()) {
            engine.shutdown();
        }
        let failed = load_error.lock().expect("load error").take();
        match failed {
            Some(msg) => Err(ServeError::Load(msg)),
            None => Ok(()),
        }
    }
}

/// Loads the model and tokenizer, compiles the chat template and starts the scheduler (or,
/// for a sentence-transformers directory, loads the encoder for `/v1/embeddings`).
fn load(state: &AppState) -> Result<(), ServeError> {
    let cfg = &state.cfg;
    if is_sentence_transformers_dir(&cfg.model) {
        let tokenizer =
            kiln_load::load_tokenizer(&cfg.model).map_err(|e| ServeError::Load(e.to_string()))?;
        let encoder =
            SentenceEncoder::load(&cfg.model).map_err(|e| ServeError::Load(e.to_string()))?;
        let ctx = encoder.model.config().max_seq_len;
        let _ = state.ready.set(Ready {
            engine: None,
            embedder: Some(Arc::new(encoder)),
            tokenizer: Arc::new(tokenizer),
            template: None,
            ctx,
            base_fingerprint: Vec::new(),
            config: None,
            generation: Default::default(),
            tool_format: None,
            token_bytes: OnceLock::new(),
        });
        tracing::info!(model = %state.model_id, "ready (embeddings)");
        return Ok(());
    }
    let mut m = kiln_load::load_inference(&cfg.model, cfg.weights, &candle_core::Device::Cpu)
        .map_err(|e| ServeError::Load(e.to_string()))?;
    let base_fingerprint = m
        .model
        .norm_fingerprint()
        .map_err(|e| ServeError::Load(e.to_string()))?;
    for (name, dir) in &cfg.adapters {
        let a = kiln_load::load_adapter(dir, &m.config, &candle_core::Device::Cpu)
            .and_then(|a| {
                a.check_base(&cfg.model, &base_fingerprint, false)
                    .map(|_| a)
            })
            .map_err(|e| ServeError::Load(format!("--adapter {name}={}: {e}", dir.display())))?;
        let id = m
            .model
            .add_served_adapter(&a.params, &a.spec)
            .map_err(|e| ServeError::Load(format!("--adapter {name}={}: {e}", dir.display())))?;
        state
            .adapters
            .write()
            .expect("adapters lock")
            .push((name.clone(), id));
    }
    let model_ctx = m.config.max_seq_len;
    let ctx = cfg.ctx.unwrap_or(model_ctx);
    if ctx > model_ctx || ctx < 2 {
        return Err(ServeError::Config(format!(
            "--ctx {ctx}: the model's context is {model_ctx} tokens (give 2 to {model_ctx})"
        )));
    }
    let tokenizer = Arc::new(m.tokenizer);
    let template = match &tokenizer.chat_template {
        Some(src) => Some(
            ChatTemplate::new(
                src,
                tokenizer.bos.as_ref().map(|b| b.1.as_str()),
                tokenizer.eos.as_ref().map(|e| e.1.as_str()),
            )
            .map_err(|e| ServeError::Load(e.to_string()))?,
        ),
        None => None,
    };
    let tool_format = tokenizer
        .chat_template
        .as_deref()
        .and_then(tools::ToolFormat::of_template);
    let engine = engine::spawn(
        m.model,
        Arc::new(tokenizer.tokenizer.clone()),
        EngineConfig {
            max_batch: cfg.max_batch,
            max_queue: cfg.max_queue,
            ctx,
            prefill_chunk: cfg.prefill_chunk,
        },
        state.metrics.clone(),
    );
    let _ = state.ready.set(Ready {
        engine: Some(engine),
        embedder: None,
        tokenizer,
        tool_format,
        template,
        ctx,
        config: Some(m.config.clone()),
        base_fingerprint,
        generation: m.generation.clone(),
        token_bytes: OnceLock::new(),
    });
    tracing::info!(model = %state.model_id, ctx, "ready");
    Ok(())
}

fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/models", get(routes::models))
        .route("/v1/chat/completions", post(routes::chat))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/embeddings", post(routes::embeddings))
        .route("/v1/responses", post(translate::responses))
        .route("/v1/messages", post(translate::messages))
        .route("/v1/adapters", post(routes::add_adapter))
        .route("/metrics", get(routes::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::require_key,
        ));
    Router::new()
        .route("/health", get(routes::health))
        .route("/", get(routes::page))
        .merge(api)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(
            state.cfg.max_body_bytes,
        ))
        .with_state(state)
}
