//! `lockstep serve`: an OpenAI-compatible HTTP server over lockstep's engine.
//!
//! - `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (the chat template as
//!   `lockstep generate --chat` renders it), `stream: true` as server-sent events in OpenAI's
//!   chunk format ending with `data: [DONE]`, `GET /health`.
//! - Continuous batching ([`scheduler`]): one thread owns the model and runs one decode step for
//!   every running request together; a request joins at the next step and leaves when done, and
//!   a client that disconnects frees its slot. Each request keeps its own sampler and random
//!   stream, and each row of a batched step computes bit for bit what it would alone, so a
//!   request's text is exactly what `lockstep generate` gives for the same prompt and settings.
//! - Requests are checked field by field ([`api`]); bad JSON or values get OpenAI-style 400s.
//! - SIGINT / SIGTERM stop accepting connections, let the running requests finish, then return.
//!
//! HTTP comes from axum on tokio; the decode loop is a plain thread fed through a channel, so the
//! async side never blocks on the model.

#![deny(missing_docs)]

pub mod api;
pub mod error;
pub mod routes;
pub mod scheduler;

pub use error::{ApiError, ServeError};

use lockstep_engine::chat::ChatTemplate;
use lockstep_engine::generate::GenerationDefaults;
use lockstep_engine::{with_float, Model, Tokenizer};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// The compute precision of the served model (as `lockstep generate --dtype`).
pub use lockstep_engine::Dtype;

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A Hugging Face model folder or a `.gguf` file.
    pub model: PathBuf,
    /// The address to listen on.
    pub host: String,
    /// The port (0: any free port; the one chosen is printed).
    pub port: u16,
    /// Compute precision.
    pub dtype: Dtype,
    /// Most requests decoding at once; more wait for a slot.
    pub max_batch: usize,
    /// A deliberate bug in the engine (a testing aid: a server `lockstep verify --endpoint` must
    /// fail); `None` in normal use.
    pub fault: Option<lockstep_engine::Fault>,
}

/// The id a model is served under: its folder's (or file's) name.
pub fn model_id(path: &std::path::Path) -> String {
    let full = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let name = full
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    name.strip_suffix(".gguf")
        .map(str::to_string)
        .unwrap_or(name)
}

/// Loads the model, serves until SIGINT / SIGTERM, drains the running requests and returns.
/// Progress lines (`listening on http://HOST:PORT`, ...) go to stderr.
pub fn serve(o: &ServeOptions) -> Result<(), ServeError> {
    if o.max_batch == 0 {
        return Err(ServeError::Input("--max-batch must be at least 1".into()));
    }
    let t0 = std::time::Instant::now();
    let tokenizer = Arc::new(Tokenizer::from_dir(&o.model)?);
    let mut model = Model::load_with_fault(&o.model, o.fault)?;
    model.use_dtype(o.dtype)?;
    let defaults = GenerationDefaults::from_dir(&o.model, &model.config)?;
    let template = ChatTemplate::from_dir(&o.model)?;
    let stats = Arc::new(scheduler::Stats::default());
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let info = api::ModelInfo {
        id: model_id(&o.model),
        created,
        defaults,
        template,
        tokenizer: tokenizer.clone(),
        vocab_size: model.config.vocab_size,
        max_ctx: model.config.max_position_embeddings,
    };
    if let Some(f) = o.fault {
        eprintln!("warning: serving with the injected fault `{f}` (a testing aid; its answers are wrong on purpose)");
    }
    eprintln!(
        "loaded {} in {:.2} s ({} layers, {:?}); serving it as `{}`, up to {} requests at once",
        o.model.display(),
        t0.elapsed().as_secs_f64(),
        model.config.num_layers,
        o.dtype,
        info.id,
        o.max_batch
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let engine = scheduler::Engine {
        model,
        tokenizer,
        max_batch: o.max_batch,
        stats: stats.clone(),
    };
    let dtype = o.dtype;
    let decode_loop = std::thread::Builder::new()
        .name("lockstep-decode".into())
        .spawn(move || with_float!(dtype.precision(), T => scheduler::run::<T>(engine, rx)))
        .map_err(|source| ServeError::Io {
            what: "cannot start the decode thread".into(),
            source,
        })?;
    let state = Arc::new(routes::AppState {
        info,
        jobs: Mutex::new(Some(tx)),
        stats,
        counter: AtomicU64::new(0),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| ServeError::Io {
            what: "cannot start the async runtime".into(),
            source,
        })?;
    let addr = format!("{}:{}", o.host, o.port);
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| ServeError::Io {
                what: format!("cannot listen on {addr}"),
                source,
            })?;
        let local = listener.local_addr().map_err(|source| ServeError::Io {
            what: "cannot read the bound address".into(),
            source,
        })?;
        eprintln!("listening on http://{local}");
        axum::serve(listener, routes::router(state.clone()))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|source| ServeError::Io {
                what: "the server failed".into(),
                source,
            })
    });
    // No new requests: the loop ends once the running ones are done.
    state.jobs.lock().unwrap().take();
    drop(state);
    let _ = decode_loop.join();
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if result.is_ok() {
        eprintln!("stopped");
    }
    result
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutting down: finishing the running requests, accepting no new ones");
}
