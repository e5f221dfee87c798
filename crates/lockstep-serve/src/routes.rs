//! The HTTP side: routes, the JSON of responses, and server-sent events in OpenAI's chunk format.

use crate::api::{self, Kind, ModelInfo, Request, TokenLogprob};
use crate::error::ApiError;
use crate::scheduler::{Event, Job, Stats};
use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lockstep_engine::generate::FinishReason;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// What every handler shares.
pub struct AppState {
    /// The model's description.
    pub info: ModelInfo,
    /// The decode loop's queue (`None` once the server is shutting down).
    pub jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    /// The loop's counters.
    pub stats: Arc<Stats>,
    /// Requests answered so far (for ids).
    pub counter: AtomicU64,
}

/// The routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .fallback(|| async { ApiError::not_found("no such route", None) })
        .with_state(state)
}

async fn health(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "model": s.info.id,
        "running": s.stats.running.load(Ordering::Relaxed),
        "waiting": s.stats.waiting.load(Ordering::Relaxed),
        "finished": s.stats.finished.load(Ordering::Relaxed),
    }))
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.info.id,
            "object": "model",
            "created": s.info.created,
            "owned_by": "lockstep",
            "max_model_len": s.info.max_ctx,
        }],
    }))
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    respond(s, Kind::Completion, body).await
}

async fn chat(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    respond(s, Kind::Chat, body).await
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `stop` for an EOS or a stop string, `length` for the token limit or a full context.
fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Context => "length",
    }
}

/// Checks the request, queues it, and answers with one JSON object or a stream of events.
async fn respond(s: Arc<AppState>, kind: Kind, body: Bytes) -> Response {
    let req = match api::parse(kind, &body, &s.info) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (tx, rx) = unbounded_channel();
    let job = Job {
        prompt: req.prompt.clone(),
        opts: req.opts.clone(),
        logprobs: req.logprobs,
        prompt_logprobs: req.echo,
        events: tx,
    };
    let queued = match s.jobs.lock().unwrap().as_ref() {
        Some(q) => q.send(job).is_ok(),
        None => false,
    };
    if !queued {
        return ApiError {
            status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
            ..ApiError::server("the server is shutting down")
        }
        .into_response();
    }
    let n = s.counter.fetch_add(1, Ordering::Relaxed);
    let prefix = if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let meta = Meta {
        id: format!("{prefix}-{:x}{n:06}", s.info.created),
        created: now(),
        model: s.info.id.clone(),
        kind,
        token_ids: req.token_ids,
    };
    if req.stream {
        stream(s, req, meta, rx).into_response()
    } else {
        whole(&s, &req, &meta, rx).await
    }
}

/// A response's id, time and model.
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    /// `return_tokens_as_token_ids`: log-probability tokens as `token_id:N`.
    token_ids: bool,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    /// A response object with one choice (or none, for the usage chunk).
    fn wrap(&self, chunk: bool, choices: Vec<Value>, usage: Option<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// Log-probabilities in the endpoint's format: completions' `tokens` / `token_logprobs` /
/// `top_logprobs` / `text_offset` lists, chat's `content` list.
/// With `token_ids` (vLLM's `return_tokens_as_token_ids`) each token is written `token_id:N`, so
/// a client can tell apart tokens whose text is the same (a lone byte of a multi-byte character).
fn logprobs_json(info: &ModelInfo, meta: &Meta, lps: &[TokenLogprob], offset: &mut usize) -> Value {
    let text = |id: u32| {
        if meta.token_ids {
            format!("token_id:{id}")
        } else {
            info.tokenizer.decode(&[id]).unwrap_or_default()
        }
    };
    match meta.kind {
        Kind::Completion => {
            let tokens: Vec<String> = lps.iter().map(|l| text(l.token)).collect();
            let mut offsets = Vec::with_capacity(tokens.len());
            for t in &tokens {
                offsets.push(*offset);
                *offset += t.chars().count();
            }
            json!({
                "tokens": tokens,
                "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                "top_logprobs": lps.iter().map(|l| {
                    l.top.iter().map(|&(id, lp)| (text(id), Value::from(lp))).collect::<serde_json::Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
        Kind::Chat => {
            let entry = |id: u32, lp: f64| {
                let t = text(id);
                json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
            };
            json!({"content": lps.iter().map(|l| {
                let mut e = entry(l.token, l.logprob);
                e["top_logprobs"] = l.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                e
            }).collect::<Vec<_>>()})
        }
    }
}

/// Completions' log-probabilities with `echo`: the first prompt token (which nothing predicts,
/// so its log-probability and alternatives are null), then `lps` (the other prompt tokens and the
/// generated ones).
fn echo_logprobs(info: &ModelInfo, meta: &Meta, first: u32, lps: &[TokenLogprob]) -> Value {
    let first_text = if meta.token_ids {
        format!("token_id:{first}")
    } else {
        info.tokenizer.decode(&[first]).unwrap_or_default()
    };
    let shift = first_text.chars().count();
    let mut v = logprobs_json(info, meta, lps, &mut shift.clone());
    let lists = ["tokens", "token_logprobs", "top_logprobs", "text_offset"];
    let firsts = [json!(first_text), Value::Null, Value::Null, json!(0)];
    for (k, f) in lists.into_iter().zip(firsts) {
        if let Some(Value::Array(a)) = v.get_mut(k) {
            a.insert(0, f);
        }
    }
    v
}

/// Waits for the whole generation and answers with one object.
async fn whole(
    s: &AppState,
    req: &Request,
    meta: &Meta,
    mut rx: UnboundedReceiver<Event>,
) -> Response {
    let mut text = String::new();
    let mut lps = Vec::new();
    let mut prompt_lps: Vec<TokenLogprob> = Vec::new();
    loop {
        match rx.recv().await {
            Some(Event::Prompt(p)) => prompt_lps = p,
            Some(Event::Token { text: t, logprob }) => {
                text.push_str(&t);
                lps.extend(logprob);
            }
            Some(Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            }) => {
                let logprobs = match (req.logprobs, req.echo) {
                    (None, _) => Value::Null,
                    (Some(_), false) => logprobs_json(&s.info, meta, &lps, &mut 0),
                    (Some(_), true) => {
                        prompt_lps.append(&mut lps);
                        echo_logprobs(&s.info, meta, req.prompt[0], &prompt_lps)
                    }
                };
                if req.echo {
                    let prompt = s.info.tokenizer.decode(&req.prompt).unwrap_or_default();
                    text.insert_str(0, &prompt);
                }
                let choice = match meta.kind {
                    Kind::Completion => json!({
                        "index": 0, "text": text, "logprobs": logprobs,
                        "finish_reason": finish_reason(finish),
                    }),
                    Kind::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs,
                        "finish_reason": finish_reason(finish),
                    }),
                };
                let u = usage(prompt_tokens, completion_tokens);
                return Json(meta.wrap(false, vec![choice], Some(u))).into_response();
            }
            Some(Event::Error(e)) => return ApiError::server(e).into_response(),
            None => return ApiError::server("the decode loop stopped").into_response(),
        }
    }
}

/// Where a stream is.
enum Phase {
    /// Nothing sent yet (a chat stream starts with the assistant's role).
    Start,
    /// Tokens are coming.
    Tokens,
    /// The usage chunk is next.
    Usage(Value),
    /// The final `[DONE]` is next.
    Last,
    /// Everything was sent.
    Over,
}

/// Answers with server-sent events: one chunk per piece of text, a last chunk with the finish
/// reason (and a usage chunk if asked), then `data: [DONE]`. When the client goes, the stream
/// is dropped with its receiver, and the decode loop frees the row at its next step.
fn stream(
    s: Arc<AppState>,
    req: Request,
    meta: Meta,
    rx: UnboundedReceiver<Event>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let ctx = Arc::new((s, meta, req.logprobs.is_some(), req.include_usage));
    let state = (rx, Phase::Start, Vec::<TokenLogprob>::new(), 0usize);
    let events = futures_util::stream::unfold(state, move |(rx, phase, lps, offset)| {
        next_event(ctx.clone(), rx, phase, lps, offset)
    });
    Sse::new(events)
}

type StreamState = (UnboundedReceiver<Event>, Phase, Vec<TokenLogprob>, usize);

/// One choice of a chunk: completions carry `text`, chat a `delta`.
fn chunk_choice(
    kind: Kind,
    text: Option<&str>,
    lp: Value,
    finish: Option<&str>,
    role: bool,
) -> Value {
    match kind {
        Kind::Completion => {
            json!({"index": 0, "text": text.unwrap_or(""), "logprobs": lp, "finish_reason": finish})
        }
        Kind::Chat => {
            let mut delta = json!({});
            if role {
                delta["role"] = "assistant".into();
            }
            if let Some(t) = text {
                delta["content"] = t.into();
            }
            json!({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish})
        }
    }
}

/// The next event of a stream and the state after it; `None` at the end.
async fn next_event(
    ctx: Arc<(Arc<AppState>, Meta, bool, bool)>,
    mut rx: UnboundedReceiver<Event>,
    phase: Phase,
    mut lps: Vec<TokenLogprob>,
    mut offset: usize,
) -> Option<(Result<SseEvent, Infallible>, StreamState)> {
    let (s, meta, want_lp, include_usage) = (&ctx.0, &ctx.1, ctx.2, ctx.3);
    let data = |v: Value| Ok::<_, Infallible>(SseEvent::default().data(v.to_string()));
    let kind = meta.kind;
    match phase {
        Phase::Over => None,
        Phase::Last => Some((
            Ok(SseEvent::default().data("[DONE]")),
            (rx, Phase::Over, lps, offset),
        )),
        Phase::Usage(u) => Some((data(u), (rx, Phase::Last, lps, offset))),
        Phase::Start if kind == Kind::Chat => {
            let c = chunk_choice(kind, Some(""), Value::Null, None, true);
            Some((
                data(meta.wrap(true, vec![c], None)),
                (rx, Phase::Tokens, lps, offset),
            ))
        }
        Phase::Start | Phase::Tokens => loop {
            match rx.recv().await {
                // `echo` is refused with `stream`: no prompt log-probabilities come here.
                Some(Event::Prompt(_)) => continue,
                Some(Event::Token { text, logprob }) => {
                    lps.extend(logprob);
                    if text.is_empty() {
                        continue;
                    }
                    let lp = if want_lp {
                        logprobs_json(&s.info, meta, &std::mem::take(&mut lps), &mut offset)
                    } else {
                        Value::Null
                    };
                    let c = chunk_choice(kind, Some(&text), lp, None, false);
                    break Some((
                        data(meta.wrap(true, vec![c], None)),
                        (rx, Phase::Tokens, lps, offset),
                    ));
                }
                Some(Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    let lp = if want_lp && !lps.is_empty() {
                        logprobs_json(&s.info, meta, &std::mem::take(&mut lps), &mut offset)
                    } else {
                        Value::Null
                    };
                    let text = (kind == Kind::Completion).then_some("");
                    let c = chunk_choice(kind, text, lp, Some(finish_reason(finish)), false);
                    // OpenAI sends the usage in a chunk of its own, with no choices, after the
                    // finish reason.
                    let next = if include_usage {
                        Phase::Usage(meta.wrap(
                            true,
                            vec![],
                            Some(usage(prompt_tokens, completion_tokens)),
                        ))
                    } else {
                        Phase::Last
                    };
                    break Some((
                        data(meta.wrap(true, vec![c], None)),
                        (rx, next, lps, offset),
                    ));
                }
                Some(Event::Error(e)) => {
                    break Some((
                        data(ApiError::server(e).body()),
                        (rx, Phase::Last, lps, offset),
                    ));
                }
                None => {
                    let e = ApiError::server("the decode loop stopped").body();
                    break Some((data(e), (rx, Phase::Last, lps, offset)));
                }
            }
        },
    }
}
