//! The decode loop: one thread owns the model and runs every request (continuous batching).
//!
//! Each turn it admits waiting requests while fewer than `max_batch` rows are running (each
//! prefilled alone, exactly as `lockstep generate` prefills), then runs one decode step for every
//! running row together ([`decode_step`]: one matmul over all rows, each row attending over its
//! own cache at its own position). A row leaves when it finishes or when its client has gone (its
//! event channel is closed), so its slot and cache are freed at once. Every row has its own
//! [`Sequence`] (sampler settings, random stream, stop state), so what a request gets never
//! depends on what else is running.

use crate::api::TokenLogprob;
use lockstep_engine::generate::{decode_visible, FinishReason, GenerateOptions};
use lockstep_engine::sequence::{decode_step, Sequence};
use lockstep_engine::{EngineError, Float, KvCache, Model, Tokenizer};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// One request for the loop.
pub struct Job {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// Sampling and stopping.
    pub opts: GenerateOptions,
    /// `Some(k)`: report each chosen token's log-probability and the `k` most likely.
    pub logprobs: Option<usize>,
    /// With `logprobs`: also each prompt token's (after the first), before the first token.
    pub prompt_logprobs: bool,
    /// Where the request's events go; closed when the client has gone.
    pub events: UnboundedSender<Event>,
}

/// What the loop tells a request.
#[derive(Debug)]
pub enum Event {
    /// The prompt's tokens after the first, each with its log-probability and the most likely
    /// tokens at its position (`echo` with `logprobs`), from a forward pass of its own.
    Prompt(Vec<TokenLogprob>),
    /// One generated token and the text it made printable (possibly empty).
    Token {
        /// The text.
        text: String,
        /// The token's log-probability and the top alternatives, when asked for.
        logprob: Option<TokenLogprob>,
    },
    /// The request is complete.
    Done {
        /// Why it ended.
        finish: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens (an ending EOS included).
        completion_tokens: usize,
    },
    /// The engine failed on this request.
    Error(String),
}

/// Counters for `/health`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Rows decoding now.
    pub running: AtomicUsize,
    /// Requests waiting for a slot.
    pub waiting: AtomicUsize,
    /// Requests finished since start.
    pub finished: AtomicUsize,
}

/// A running row.
struct Row {
    seq: Sequence,
    job: Job,
}

/// The loop's fixed inputs.
pub struct Engine {
    /// The model.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// Most rows decoding at once.
    pub max_batch: usize,
    /// Shared counters.
    pub stats: Arc<Stats>,
}

/// Runs the loop in compute precision `T` until every sender of `jobs` is gone and the last
/// request is done.
pub fn run<T: Float>(engine: Engine, jobs: Receiver<Job>) {
    let Engine {
        model,
        tokenizer,
        max_batch,
        stats,
    } = engine;
    let decode = |ids: &[u32]| decode_visible(&tokenizer, ids);
    let max_ctx = model.config.max_position_embeddings;
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut caches: Vec<KvCache<T>> = Vec::new();
    let mut open = true;
    loop {
        // Take new requests; sleep on the channel only when there is nothing to do.
        if rows.is_empty() && waiting.is_empty() {
            if !open {
                break;
            }
            stats.waiting.store(0, Ordering::Relaxed);
            stats.running.store(0, Ordering::Relaxed);
            match jobs.recv() {
                Ok(j) => waiting.push_back(j),
                Err(_) => break,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(j) => waiting.push_back(j),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        waiting.retain(|j| !j.events.is_closed());
        while rows.len() < max_batch {
            let Some(job) = waiting.pop_front() else {
                break;
            };
            if let Some((row, cache)) = admit::<T>(&model, job, max_ctx, &decode, &stats) {
                rows.push(row);
                caches.push(cache);
            }
        }
        // Clients that left free their slot before the step.
        let gone: Vec<bool> = rows.iter().map(|r| r.job.events.is_closed()).collect();
        drop_rows(&mut rows, &mut caches, &gone);
        stats.waiting.store(waiting.len(), Ordering::Relaxed);
        stats.running.store(rows.len(), Ordering::Relaxed);
        if rows.is_empty() {
            continue;
        }
        let next: Vec<u32> = rows
            .iter()
            .map(|r| *r.seq.context().last().expect("a prompt is never empty"))
            .collect();
        let logits = match decode_step::<T>(&model, &next, &mut caches) {
            Ok(l) => l,
            Err(e) => {
                for r in rows.drain(..) {
                    let _ = r.job.events.send(Event::Error(e.to_string()));
                }
                caches.clear();
                continue;
            }
        };
        let vocab = model.config.vocab_size;
        let mut done = vec![false; rows.len()];
        for ((row, d), l) in rows.iter_mut().zip(&mut done).zip(logits.chunks(vocab)) {
            *d = !advance(row, l, max_ctx, &decode, &stats);
        }
        drop_rows(&mut rows, &mut caches, &done);
        stats.running.store(rows.len(), Ordering::Relaxed);
    }
    stats.running.store(0, Ordering::Relaxed);
}

/// Removes the rows (and their caches) whose flag is set.
fn drop_rows<T: Float>(rows: &mut Vec<Row>, caches: &mut Vec<KvCache<T>>, drop: &[bool]) {
    if !drop.contains(&true) {
        return;
    }
    let mut flags = drop.iter();
    rows.retain(|_| !*flags.next().unwrap());
    let mut flags = drop.iter();
    caches.retain(|_| !*flags.next().unwrap());
}

/// Prefills a new request alone and takes its first token; `None` when it is already done.
fn admit<T: Float>(
    model: &Model,
    job: Job,
    max_ctx: usize,
    decode: &impl Fn(&[u32]) -> lockstep_engine::Result<String>,
    stats: &Stats,
) -> Option<(Row, KvCache<T>)> {
    let mut row = Row {
        seq: Sequence::new(job.prompt.clone(), &job.opts),
        job,
    };
    if row.seq.finish().is_some() {
        finish(&row, stats);
        return None;
    }
    if let (Some(k), true) = (row.job.logprobs, row.job.prompt_logprobs) {
        // Every position's logits from a pass of its own, so the generation's prefill is the
        // same as without `echo`.
        let p = &row.job.prompt;
        let mut scratch = KvCache::<T>::new(model.config.num_layers);
        match model.forward::<T>(p, &mut scratch, &mut lockstep_engine::NoObserver) {
            Ok(all) => {
                let v = model.config.vocab_size;
                let lps = (1..p.len())
                    .map(|i| crate::api::token_logprob(&all[(i - 1) * v..i * v], p[i], k))
                    .collect();
                let _ = row.job.events.send(Event::Prompt(lps));
            }
            Err(e) => {
                let _ = row.job.events.send(Event::Error(e.to_string()));
                return None;
            }
        }
    }
    let mut cache = KvCache::<T>::new(model.config.num_layers);
    match model.forward_last::<T>(&row.job.prompt, &mut cache) {
        Ok(logits) => advance(&mut row, &logits, max_ctx, decode, stats).then_some((row, cache)),
        Err(e) => {
            let _ = row.job.events.send(Event::Error(e.to_string()));
            None
        }
    }
}

/// Takes a row's next token from its logits and sends what it produced; false when the row is
/// done (finished, failed, or its client gone).
fn advance<T: Float>(
    row: &mut Row,
    logits: &[T],
    max_ctx: usize,
    decode: &impl Fn(&[u32]) -> lockstep_engine::Result<String>,
    stats: &Stats,
) -> bool {
    if let Some(bad) = logits.iter().find(|x| !x.to_f64().is_finite()) {
        let e = EngineError::NonFinite(format!(
            "the logits at generation step {} are {} ({} context tokens)",
            row.seq.generated().len(),
            if bad.to_f64().is_nan() {
                "NaN"
            } else {
                "infinite"
            },
            row.seq.context().len()
        ));
        let _ = row.job.events.send(Event::Error(e.to_string()));
        return false;
    }
    let text = match row.seq.step(logits, &row.job.opts, max_ctx, decode) {
        Ok(t) => t,
        Err(e) => {
            let _ = row.job.events.send(Event::Error(e.to_string()));
            return false;
        }
    };
    let token = *row.seq.context().last().expect("just pushed");
    let logprob = row
        .job
        .logprobs
        .map(|k| crate::api::token_logprob(logits, token, k));
    if row.job.events.send(Event::Token { text, logprob }).is_err() {
        return false;
    }
    if row.seq.finish().is_some() {
        finish(row, stats);
        return false;
    }
    true
}

/// Sends a finished row's `Done`.
fn finish(row: &Row, stats: &Stats) {
    stats.finished.fetch_add(1, Ordering::Relaxed);
    let _ = row.job.events.send(Event::Done {
        finish: row.seq.finish().unwrap_or(FinishReason::Length),
        prompt_tokens: row.seq.prompt_len(),
        completion_tokens: row.seq.generated().len(),
    });
}
