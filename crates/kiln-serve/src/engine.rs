//! The scheduler: one thread owns the model and its KV cache and runs continuous batching.
//!
//! The cache has `max_batch` rows, the *slots*. A request with `n` choices takes `n` free
//! slots; its prompt is prefilled once, at most `prefill_chunk` prompt tokens per step (of
//! one request or several) so that the streams already running get a decode step between
//! chunks, and copied to the other
//! choices' slots. Every iteration then feeds one token to every decoding sequence in one
//! `decode_step` (each projection runs once over all rows). Requests join and leave the batch
//! between steps.
//!
//! A slot keeps its tokens' keys and values after its request ends. A new request takes the
//! free slot whose cached tokens share the longest prefix with its prompt (else the one
//! unused longest) and prefills only the rest, so a conversation's earlier turns or a shared
//! system prompt are not computed twice (llama-server's slot cache works the same way).
//!
//! A request whose receiver is gone (the client disconnected) is dropped before the next
//! step and its slots are freed.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use kiln_data::KilnTokenizer;
use kiln_infer::{
    row_values, FinishReason, GenerateOptions, Sampler, SamplingParams, Sequence, TokenConstraint,
};
use kiln_model::{CausalLm, KvCache};
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;

/// Limits of the scheduler.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together (KV-cache rows).
    pub max_batch: usize,
    /// Requests waiting for a slot before new ones are refused.
    pub max_queue: usize,
    /// Tokens per sequence, prompt and output (at most the model's context).
    pub ctx: usize,
    /// Prompt tokens prefilled between two decode steps.
    pub prefill_chunk: usize,
}

/// Builds the constraint of one choice (each choice walks its own automaton).
pub type ConstraintFactory = Arc<dyn Fn() -> Box<dyn TokenConstraint> + Send + Sync>;

/// One generation request, already tokenized and validated.
pub struct GenRequest {
    pub prompt: Vec<u32>,
    /// Choices sampled from the one prompt.
    pub n: usize,
    /// Choice `i` samples with seed `params.seed + i`.
    pub params: SamplingParams,
    pub opts: GenerateOptions,
    /// Record this many alternatives per token (`Some(0)`: only the chosen token's).
    pub logprobs: Option<usize>,
    pub constraint: Option<ConstraintFactory>,
    /// Keep special tokens (not the stop tokens) in the text.
    pub keep_special: bool,
    /// The served LoRA adapter (0: the base).
    pub adapter: u16,
    pub events: UnboundedSender<Event>,
}

/// A generated token as the API reports it.
#[derive(Debug, Clone)]
pub struct TokenOut {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What the scheduler tells a request, in order.
#[derive(Debug)]
pub enum Event {
    /// The prompt is in the cache; `cached_tokens` of it were reused from a slot.
    Prefilled { cached_tokens: usize },
    /// New text of one choice (possibly empty while a stop string is undecided) and the
    /// tokens that produced it.
    Delta {
        choice: usize,
        text: String,
        tokens: Vec<TokenOut>,
    },
    /// One choice is finished.
    Done {
        choice: usize,
        finish: FinishReason,
        completion_tokens: usize,
        /// The stop string that ended it, if one did.
        stop: Option<String>,
    },
    /// The request failed inside the model; no more events follow.
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is busy: {0} requests are already waiting; retry later")]
    QueueFull(usize),
    #[error("n = {n} needs {n} decode slots but the server has {max_batch} (--max-batch)")]
    TooManyChoices { n: usize, max_batch: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
}

/// The requests waiting for slots, shared between the HTTP side and the scheduler.
/// Work for the scheduler other than generation, done between steps.
pub enum Command {
    /// Serve another LoRA adapter; the reply carries its id.
    AddAdapter {
        params: kiln_model::Params,
        spec: kiln_model::LoraSpec,
        reply: tokio::sync::oneshot::Sender<Result<u16, String>>,
    },
    /// Pooled final hidden states of each text (`--embeddings` on a decoder).
    Embed {
        texts: Vec<Vec<u32>>,
        last: bool,
        reply: tokio::sync::oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
    },
}

struct Queue {
    waiting: VecDeque<(GenRequest, Instant)>,
    commands: Vec<Command>,
    /// Slots free after the scheduler's last admission: requests that will get one at the
    /// next step do not count against `max_queue`.
    free_slots: usize,
    shutdown: bool,
}

/// The HTTP side's handle on the scheduler.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<(Mutex<Queue>, Condvar)>,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// Queues a request; refused when the queue is full.
    pub fn submit(&self, req: GenRequest) -> Result<(), SubmitError> {
        if req.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if req.n > self.cfg.max_batch {
            return Err(SubmitError::TooManyChoices {
                n: req.n,
                max_batch: self.cfg.max_batch,
            });
        }
        let (lock, wake) = &*self.shared;
        let mut q = lock.lock().expect("queue lock");
        if q.waiting.len() >= self.cfg.max_queue + q.free_slots {
            return Err(SubmitError::QueueFull(q.waiting.len()));
        }
        q.waiting.push_back((req, Instant::now()));
        self.metrics.set_waiting(q.waiting.len());
        wake.notify_one();
        Ok(())
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Hands the scheduler a command, done before its next step.
    pub fn command(&self, c: Command) {
        let (lock, wake) = &*self.shared;
        lock.lock().expect("queue lock").commands.push(c);
        wake.notify_one();
    }

    /// Stops the scheduler after the current step.
    pub fn shutdown(&self) {
        let (lock, wake) = &*self.shared;
        lock.lock().expect("queue lock").shutdown = true;
        wake.notify_all();
    }
}

/// Starts the scheduler thread over `model`.
pub fn spawn(
    model: Box<dyn CausalLm + Send>,
    tokenizer: Arc<KilnTokenizer>,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
) -> EngineHandle {
    let shared = Arc::new((
        Mutex::new(Queue {
            waiting: VecDeque::new(),
            commands: Vec::new(),
            free_slots: cfg.max_batch,
            shutdown: false,
        }),
        Condvar::new(),
    ));
    let handle = EngineHandle {
        shared: shared.clone(),
        cfg: cfg.clone(),
        metrics: metrics.clone(),
    };
    std::thread::Builder::new()
        .name("kiln-scheduler".into())
        .spawn(move || {
            let mut s = Scheduler::new(model, tokenizer, cfg, metrics);
            s.run(&shared);
        })
        .expect("spawning the scheduler thread");
    handle
}

/// A KV-cache row and the tokens whose keys and values it holds.
struct Slot {
    cached: Vec<u32>,
    /// The adapter those keys and values were computed with (a prefix is reused only by a
    /// request for the same adapter).
    adapter: u16,
    busy: bool,
    last_used: u64,
}

struct Choice {
    slot: usize,
    seq: Sequence,
    sampler: Sampler,
    /// Logits to sample the next token from (after prefill or a decode step).
    logits: Option<Vec<f32>>,
    done: bool,
    last_token_at: Option<Instant>,
}

struct Job {
    req: GenRequest,
    submitted: Instant,
    /// Prompt tokens already in the first choice's slot.
    prefilled: usize,
    /// Prompt tokens found in the slot's cache at admission.
    cached_tokens: usize,
    choices: Vec<Choice>,
    first_token_seen: bool,
}

impl Job {
    fn prefilling(&self) -> bool {
        self.prefilled < self.req.prompt.len()
    }

    fn cancelled(&self) -> bool {
        self.req.events.is_closed()
    }

    fn finished(&self) -> bool {
        self.choices.iter().all(|c| c.done)
    }
}

struct Scheduler {
    model: Box<dyn CausalLm + Send>,
    tokenizer: Arc<KilnTokenizer>,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    cache: KvCache,
    slots: Vec<Slot>,
    jobs: Vec<Job>,
    clock: u64,
}

/// Length of the common prefix of `a` and `b`.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Scheduler {
    fn new(
        model: Box<dyn CausalLm + Send>,
        tokenizer: Arc<KilnTokenizer>,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let slots = (0..cfg.max_batch)
            .map(|_| Slot {
                cached: Vec::new(),
                adapter: 0,
                busy: false,
                last_used: 0,
            })
            .collect();
        Self {
            model,
            tokenizer,
            cfg,
            metrics,
            cache: KvCache::new(),
            slots,
            jobs: Vec::new(),
            clock: 0,
        }
    }

    fn free_slots(&self) -> usize {
        self.slots.iter().filter(|s| !s.busy).count()
    }

    fn run(&mut self, shared: &(Mutex<Queue>, Condvar)) {
        let (lock, wake) = shared;
        loop {
            {
                let mut q = lock.lock().expect("queue lock");
                while self.jobs.is_empty()
                    && q.waiting.is_empty()
                    && q.commands.is_empty()
                    && !q.shutdown
                {
                    q = wake.wait(q).expect("queue lock");
                }
                if q.shutdown {
                    return;
                }
                for c in q.commands.drain(..) {
                    match c {
                        Command::AddAdapter {
                            params,
                            spec,
                            reply,
                        } => {
                            let r = self
                                .model
                                .add_served_adapter(&params, &spec)
                                .map_err(|e| e.to_string());
                            let _ = reply.send(r);
                        }
                        Command::Embed { texts, last, reply } => {
                            let r = texts
                                .iter()
                                .map(|t| self.model.pooled_hidden(t, last))
                                .collect::<Result<Vec<_>, _>>()
                                .map_err(|e| e.to_string());
                            let _ = reply.send(r);
                        }
                    }
                }
                // Admit in arrival order while the first waiting request fits.
                while let Some((req, _)) = q.waiting.front() {
                    if req.events.is_closed() {
                        q.waiting.pop_front();
                        continue;
                    }
                    if req.n > self.free_slots() {
                        break;
                    }
                    let (req, submitted) = q.waiting.pop_front().expect("front exists");
                    self.admit(req, submitted);
                }
                q.free_slots = self.free_slots();
                self.metrics.set_waiting(q.waiting.len());
            }
            self.drop_cancelled();
            if let Err(e) = self.step() {
                // A model error fails every running request; the server stays up.
                let msg = e.to_string();
                tracing::error!(error = %msg, "decode step failed");
                for job in self.jobs.drain(..) {
                    let _ = job.req.events.send(Event::Failed(msg.clone()));
                    for c in &job.choices {
                        self.slots[c.slot].busy = false;
                        self.slots[c.slot].cached.clear();
                        self.cache.clear_row(c.slot);
                    }
                }
            }
            self.retire_finished();
            self.metrics.set_running(
                self.jobs.iter().map(|j| j.choices.len()).sum(),
                self.slots.iter().map(|s| s.cached.len()).sum(),
                self.cfg.max_batch * self.cfg.ctx,
            );
        }
    }

    /// Gives `req` its slots: the first choice the free slot sharing the longest prefix
    /// with the prompt, the others the least recently used.
    fn admit(&mut self, req: GenRequest, submitted: Instant) {
        let prompt = &req.prompt;
        // At least one prompt token is always fed, to get the logits of the next one.
        let reusable = |s: &Slot| {
            if s.adapter != req.adapter {
                return 0;
            }
            common_prefix(&s.cached, prompt).min(prompt.len() - 1)
        };
        let first = (0..self.slots.len())
            .filter(|&i| !self.slots[i].busy)
            .max_by_key(|&i| {
                (
                    reusable(&self.slots[i]),
                    std::cmp::Reverse(self.slots[i].last_used),
                )
            })
            .expect("admit is called with enough free slots");
        let reused = reusable(&self.slots[first]);
        self.cache.truncate_row(first, reused);
        self.slots[first].cached.truncate(reused);
        self.slots[first].adapter = req.adapter;
        let mut slot_ids = vec![first];
        self.slots[first].busy = true;
        for _ in 1..req.n {
            let s = (0..self.slots.len())
                .filter(|&i| !self.slots[i].busy)
                .min_by_key(|&i| self.slots[i].last_used)
                .expect("admit is called with enough free slots");
            self.slots[s].busy = true;
            slot_ids.push(s);
        }
        self.clock += 1;
        for &s in &slot_ids {
            self.slots[s].last_used = self.clock;
        }
        let choices = slot_ids
            .iter()
            .enumerate()
            .map(|(i, &slot)| {
                let mut params = req.params.clone();
                params.seed = params.seed.wrapping_add(i as u64);
                let mut sampler = Sampler::new(params).expect("validated by the API layer");
                sampler.start(prompt);
                let mut seq = Sequence::new(prompt.len(), req.logprobs.unwrap_or(0));
                if req.keep_special {
                    seq = seq.keeping_special_tokens();
                }
                if let Some(make) = &req.constraint {
                    seq = seq.with_constraint(make());
                }
                Choice {
                    slot,
                    seq,
                    sampler,
                    logits: None,
                    done: false,
                    last_token_at: None,
                }
            })
            .collect();
        self.metrics.prefix_reused(reused);
        self.metrics.prompt_tokens(prompt.len());
        self.jobs.push(Job {
            req,
            submitted,
            prefilled: reused,
            cached_tokens: reused,
            choices,
            first_token_seen: false,
        });
    }

    /// Frees the job's slots. Each keeps the tokens its row holds (a slot only ever holds
    /// tokens that were fed to it), ready for reuse by a later prompt.
    fn release(&mut self, job: &Job) {
        for c in &job.choices {
            self.slots[c.slot].busy = false;
        }
    }

    fn drop_cancelled(&mut self) {
        let (gone, keep): (Vec<Job>, Vec<Job>) = std::mem::take(&mut self.jobs)
            .into_iter()
            .partition(|j| j.cancelled() && !j.finished());
        self.jobs = keep;
        for job in gone {
            self.metrics.cancelled();
            self.release(&job);
        }
    }

    fn retire_finished(&mut self) {
        let (done, keep): (Vec<Job>, Vec<Job>) = std::mem::take(&mut self.jobs)
            .into_iter()
            .partition(Job::finished);
        self.jobs = keep;
        for job in done {
            self.release(&job);
        }
    }

    /// One scheduler iteration: a prefill chunk of the oldest prefilling request, sampling
    /// wherever logits are ready, then one decode step over every sequence that goes on.
    fn step(&mut self) -> Result<(), kiln_infer::InferError> {
        // Up to `prefill_chunk` prompt tokens per step, oldest request first, so a burst of
        // short prompts joins the batch together while a long one is split over steps.
        let mut budget = self.cfg.prefill_chunk;
        while budget > 0 {
            let Some(j) = self.jobs.iter().position(Job::prefilling) else {
                break;
            };
            budget -= self.prefill_chunk(j, budget)?;
        }
        self.sample_ready();
        let mut rows = Vec::new();
        let mut feed = Vec::new();
        let mut adapters = Vec::new();
        let mut owners = Vec::new();
        for (j, job) in self.jobs.iter().enumerate() {
            for (c, choice) in job.choices.iter().enumerate() {
                if choice.done || choice.logits.is_some() {
                    continue;
                }
                if let Some(token) = choice.seq.next_input() {
                    rows.push(choice.slot);
                    feed.push(token);
                    adapters.push(job.req.adapter);
                    owners.push((j, c));
                }
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        // Rows for different adapters (and the base) share the step: the base projections
        // run once over all rows, each row adds its own adapter's low-rank product.
        let logits = self
            .model
            .decode_step_adapters(&rows, &feed, &adapters, &mut self.cache)?;
        for (i, &(j, c)) in owners.iter().enumerate() {
            let slot = self.jobs[j].choices[c].slot;
            self.slots[slot].cached.push(feed[i]);
            self.jobs[j].choices[c].logits = Some(row_values(&logits, i)?);
        }
        self.sample_ready();
        Ok(())
    }

    /// Feeds the next chunk of job `j`'s prompt; at the end, copies the prompt to the other
    /// choices' slots and hands every choice the last position's logits.
    /// Returns how many prompt tokens it fed (at most `budget`).
    fn prefill_chunk(&mut self, j: usize, budget: usize) -> Result<usize, kiln_infer::InferError> {
        let job = &self.jobs[j];
        let slot = job.choices[0].slot;
        let end = (job.prefilled + budget).min(job.req.prompt.len());
        let chunk = job.req.prompt[job.prefilled..end].to_vec();
        let adapter = job.req.adapter;
        let logits = self
            .model
            .prefill_row_adapter(slot, &chunk, adapter, &mut self.cache)?;
        self.slots[slot].cached.extend_from_slice(&chunk);
        let job = &mut self.jobs[j];
        job.prefilled = end;
        if job.prefilling() {
            return Ok(chunk.len());
        }
        let last = row_values(&logits, 0)?;
        let copies: Vec<usize> = job.choices.iter().skip(1).map(|c| c.slot).collect();
        for c in job.choices.iter_mut() {
            c.logits = Some(last.clone());
        }
        let _ = job.req.events.send(Event::Prefilled {
            cached_tokens: job.cached_tokens,
        });
        for to in copies {
            self.cache.copy_row(slot, to);
            self.slots[to].cached = self.slots[slot].cached.clone();
            self.slots[to].adapter = self.slots[slot].adapter;
        }
        Ok(chunk.len())
    }

    /// Samples a token for every choice whose logits are ready and sends what it produced.
    fn sample_ready(&mut self) {
        let now = Instant::now();
        for job in &mut self.jobs {
            if job.cancelled() {
                continue;
            }
            for (c, choice) in job.choices.iter_mut().enumerate() {
                let Some(logits) = choice.logits.take() else {
                    continue;
                };
                let before = choice.seq.tokens().len();
                let cached = self.slots[choice.slot].cached.len();
                let text = match choice.seq.push(
                    &self.tokenizer,
                    &logits,
                    &mut choice.sampler,
                    &job.req.opts,
                    cached,
                    self.cfg.ctx,
                ) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = job.req.events.send(Event::Failed(e.to_string()));
                        choice.done = true;
                        continue;
                    }
                };
                let new = choice.seq.tokens().len() - before;
                let tokens: Vec<TokenOut> = (before..before + new)
                    .map(|i| TokenOut {
                        id: choice.seq.tokens()[i],
                        logprob: choice.seq.logprobs()[i],
                        top: choice
                            .seq
                            .top_logprobs()
                            .get(i)
                            .cloned()
                            .unwrap_or_default(),
                    })
                    .collect();
                if new > 0 {
                    self.metrics.generated_tokens(new);
                    if !job.first_token_seen {
                        job.first_token_seen = true;
                        self.metrics
                            .time_to_first_token(now.duration_since(job.submitted));
                    }
                    if let Some(prev) = choice.last_token_at {
                        self.metrics.inter_token(now.duration_since(prev));
                    }
                    choice.last_token_at = Some(now);
                }
                if !text.is_empty() || !tokens.is_empty() {
                    let _ = job.req.events.send(Event::Delta {
                        choice: c,
                        text,
                        tokens,
                    });
                }
                if let Some(finish) = choice.seq.finish_reason() {
                    choice.done = true;
                    let _ = job.req.events.send(Event::Done {
                        choice: c,
                        finish,
                        completion_tokens: choice.seq.tokens().len(),
                        stop: choice
                            .seq
                            .matched_stop()
                            .map(|i| job.req.opts.stop_strings[i].clone()),
                    });
                }
            }
        }
    }
}
