//! `kiln serve`: the OpenAI-compatible HTTP server (kiln-serve) on a tokio runtime.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use kiln_serve::{ServeConfig, Server};
use tracing::info;

#[derive(Args)]
pub struct ServeArgs {
    /// A GGUF file, an HF model directory, or a kiln run or checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// The model id clients send (default: the file or directory name).
    #[arg(long)]
    pub name: Option<String>,
    /// Address to listen on. Anything but loopback needs an API key.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health and /.
    #[arg(long, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the API key from this file (its first line), keeping it out of `ps`.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Sequences decoded together (KV-cache slots); `n` choices take n slots.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Requests waiting for a slot before new ones get 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Context per sequence, prompt and reply (default: the model's).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Prompt tokens prefilled between two decode steps of the running streams.
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Seconds a request may take before it is cancelled.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body: usize,
    /// Run on f32 copies of the weights: a GGUF dequantised, an HF checkpoint converted (by
    /// default both are used as stored).
    #[arg(long)]
    pub dequantize: bool,
    /// Quantise the weights while loading (q8_0, q4_0, q4_k, ...), one tensor at a time.
    #[arg(long, conflicts_with = "dequantize")]
    pub quantize: Option<String>,
    /// Serve a PEFT LoRA adapter as model NAME (repeatable): requests for it and for the base
    /// share the decode batch.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapters: Vec<String>,
    /// Let `POST /v1/adapters {"name": NAME}` (API key required) load DIR/NAME at run time.
    #[arg(long)]
    pub adapter_dir: Option<PathBuf>,
    /// Answer `/v1/embeddings` on a decoder with its final hidden states pooled by the mean
    /// over the text or the last token, L2-normalised (llama-server's --embeddings/--pooling).
    #[arg(long, value_name = "mean|last")]
    pub embeddings: Option<String>,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let api_key = match (&a.api_key, &a.api_key_file) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading the API key file {}", f.display()))?;
            let key = text.lines().next().unwrap_or("").trim().to_string();
            anyhow::ensure!(!key.is_empty(), "{}: the first line is empty", f.display());
            Some(key)
        }
        (None, None) => None,
    };
    anyhow::ensure!(
        a.request_timeout > 0.0 && a.request_timeout.is_finite(),
        "--request-timeout must be a positive number of seconds"
    );
    let adapters = a
        .adapters
        .iter()
        .map(|spec| match spec.split_once('=') {
            Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
                Ok((name.to_string(), PathBuf::from(dir)))
            }
            _ => anyhow::bail!("--adapter {spec:?}: expected NAME=DIR"),
        })
        .collect::<Result<Vec<_>>>()?;
    let embeddings = match a.embeddings.as_deref() {
        None => None,
        Some("mean") => Some(kiln_serve::Pooling::Mean),
        Some("last") => Some(kiln_serve::Pooling::Last),
        Some(other) => anyhow::bail!("--embeddings {other:?}: mean or last"),
    };
    let cfg = ServeConfig {
        embeddings,
        adapters,
        adapter_dir: a.adapter_dir,
        weights: crate::commands::weights_choice(a.dequantize, a.quantize.as_deref())?,
        name: a.name,
        addr: SocketAddr::new(a.host, a.port),
        api_key,
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        ctx: a.ctx,
        prefill_chunk: a.prefill_chunk,
        max_body_bytes: a.max_body,
        request_timeout: Duration::from_secs_f64(a.request_timeout),
        ..ServeConfig::new(a.model)
    };
    // A server's buffers come in every batch size: the training allocator's block cache
    // would keep one of each and grow (docs/serve.md, the load run).
    crate::GLOBAL.set_caching(false);
    // The HTTP side only parses, tokenizes and streams; the model runs on the scheduler
    // thread and the compute pool, so two runtime threads are plenty.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let server = Server::bind(cfg).await?;
        info!(
            model = server.model_id(),
            "listening on http://{} (OpenAI API under /v1, chat page at /); loading the model",
            server.local_addr()
        );
        server
            .run(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        info!("stopped");
        anyhow::Ok(())
    })
}
