//! Server metrics, written in Prometheus' text format for `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// A latency histogram with fixed bucket bounds (seconds).
struct Histogram {
    bounds: &'static [f64],
    /// Counts per bucket (not cumulative), then the overflow bucket.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    fn observe(&mut self, seconds: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += seconds;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

const TTFT_BOUNDS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const ITL_BOUNDS: &[f64] = &[0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28];

/// Counters and gauges shared by the HTTP side and the scheduler.
pub struct Metrics {
    requests: AtomicU64,
    errors: AtomicU64,
    cancelled: AtomicU64,
    running: AtomicU64,
    waiting: AtomicU64,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    prefix_hit_tokens: AtomicU64,
    prefix_hits: AtomicU64,
    kv_used: AtomicU64,
    kv_capacity: AtomicU64,
    ttft: Mutex<Histogram>,
    itl: Mutex<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            running: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            prefix_hit_tokens: AtomicU64::new(0),
            prefix_hits: AtomicU64::new(0),
            kv_used: AtomicU64::new(0),
            kv_capacity: AtomicU64::new(0),
            ttft: Mutex::new(Histogram::new(TTFT_BOUNDS)),
            itl: Mutex::new(Histogram::new(ITL_BOUNDS)),
        }
    }
}

impl Metrics {
    pub fn request(&self) {
        self.requests.fetch_add(1, Relaxed);
    }

    pub fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }

    pub fn cancelled(&self) {
        self.cancelled.fetch_add(1, Relaxed);
    }

    pub fn set_waiting(&self, n: usize) {
        self.waiting.store(n as u64, Relaxed);
    }

    /// Sequences in the batch and the KV-cache positions held (of `capacity`).
    pub fn set_running(&self, sequences: usize, kv_used: usize, kv_capacity: usize) {
        self.running.store(sequences as u64, Relaxed);
        self.kv_used.store(kv_used as u64, Relaxed);
        self.kv_capacity.store(kv_capacity as u64, Relaxed);
    }

    pub fn prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Relaxed);
    }

    pub fn generated_tokens(&self, n: usize) {
        self.generated_tokens.fetch_add(n as u64, Relaxed);
    }

    pub fn prefix_reused(&self, tokens: usize) {
        if tokens > 0 {
            self.prefix_hits.fetch_add(1, Relaxed);
            self.prefix_hit_tokens.fetch_add(tokens as u64, Relaxed);
        }
    }

    pub fn time_to_first_token(&self, d: Duration) {
        self.ttft.lock().expect("metrics").observe(d.as_secs_f64());
    }

    pub fn inter_token(&self, d: Duration) {
        self.itl.lock().expect("metrics").observe(d.as_secs_f64());
    }

    /// Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        line(
            "kiln_requests_total",
            "counter",
            "Generation requests accepted.",
            self.requests.load(Relaxed),
        );
        line(
            "kiln_request_errors_total",
            "counter",
            "Requests answered with an error.",
            self.errors.load(Relaxed),
        );
        line(
            "kiln_requests_cancelled_total",
            "counter",
            "Requests whose client went away before the end.",
            self.cancelled.load(Relaxed),
        );
        line(
            "kiln_requests_running",
            "gauge",
            "Sequences in the decode batch.",
            self.running.load(Relaxed),
        );
        line(
            "kiln_requests_waiting",
            "gauge",
            "Requests queued for a slot.",
            self.waiting.load(Relaxed),
        );
        line(
            "kiln_prompt_tokens_total",
            "counter",
            "Prompt tokens of admitted requests.",
            self.prompt_tokens.load(Relaxed),
        );
        line(
            "kiln_generation_tokens_total",
            "counter",
            "Tokens generated.",
            self.generated_tokens.load(Relaxed),
        );
        line(
            "kiln_prefix_cache_hits_total",
            "counter",
            "Requests that reused a cached prompt prefix.",
            self.prefix_hits.load(Relaxed),
        );
        line(
            "kiln_prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens not prefilled because a slot held them.",
            self.prefix_hit_tokens.load(Relaxed),
        );
        line(
            "kiln_kv_cache_used_tokens",
            "gauge",
            "KV-cache positions held by the slots.",
            self.kv_used.load(Relaxed),
        );
        line(
            "kiln_kv_cache_capacity_tokens",
            "gauge",
            "KV-cache positions the slots may hold (max batch x context).",
            self.kv_capacity.load(Relaxed),
        );
        self.ttft.lock().expect("metrics").write(
            &mut out,
            "kiln_time_to_first_token_seconds",
            "From arrival to the first generated token.",
        );
        self.itl.lock().expect("metrics").write(
            &mut out,
            "kiln_inter_token_latency_seconds",
            "Between two tokens of one sequence.",
        );
        out
    }
}
