//! The request side of the OpenAI API: a completion or chat request's JSON checked field by field
//! and turned into token ids and [`GenerateOptions`]; token log-probabilities.
//!
//! Decoding settings resolve as `lockstep generate` resolves its flags: the request's fields over
//! the checkpoint's `generation_config.json` over transformers' defaults, so a request without
//! `temperature` decodes greedily unless the checkpoint asks for sampling, and `temperature: 0`
//! is greedy. Fields lockstep does not implement (`frequency_penalty`, `presence_penalty`, `n`
//! above 1, `best_of`, `suffix`, `logit_bias`, `tools`, `echo` with `stream`) are refused with a
//! 400 naming them, as is any field OpenAI does not define. A completion's `echo: true` puts the
//! prompt before the text and, with `logprobs`, each prompt token's log-probability first. vLLM's `return_tokens_as_token_ids` is taken:
//! the log-probabilities then name each token `token_id:N` (two tokens may share a text).

use crate::error::ApiError;
use lockstep_engine::chat::{ChatTemplate, Message};
use lockstep_engine::generate::{GenerateOptions, GenerationDefaults};
use lockstep_engine::{Float, Tokenizer};
use serde_json::{Map, Value};

/// New tokens when neither the request nor generation_config.json says (as `lockstep generate`).
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// Most alternatives `logprobs` / `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `POST /v1/completions`.
    Completion,
    /// `POST /v1/chat/completions`.
    Chat,
}

/// What the server knows about its model, for checking requests.
pub struct ModelInfo {
    /// The id clients name it by (`/v1/models`).
    pub id: String,
    /// Unix seconds the server started.
    pub created: u64,
    /// generation_config.json.
    pub defaults: GenerationDefaults,
    /// The chat template, if the checkpoint has one.
    pub template: Option<ChatTemplate>,
    /// The tokenizer.
    pub tokenizer: std::sync::Arc<Tokenizer>,
    /// Vocabulary size of the model.
    pub vocab_size: usize,
    /// The context length (`max_position_embeddings`).
    pub max_ctx: usize,
}

/// A checked request.
#[derive(Debug)]
pub struct Request {
    /// The endpoint.
    pub kind: Kind,
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// Sampling and stopping.
    pub opts: GenerateOptions,
    /// `Some(k)`: each token's log-probability and the `k` most likely alternatives.
    pub logprobs: Option<usize>,
    /// Answer as server-sent events.
    pub stream: bool,
    /// With `stream`: end with a chunk holding the usage counts.
    pub include_usage: bool,
    /// vLLM's `return_tokens_as_token_ids`: tokens in log-probabilities as `token_id:N`.
    pub token_ids: bool,
    /// Completions' `echo`: the prompt before the text (and its log-probabilities first).
    pub echo: bool,
}

/// A chosen token's log-probability and the most likely tokens at its step (of the model's
/// logits as transformers casts them to float32, before any penalty or temperature).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The chosen token.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f64,
    /// The most likely tokens, most likely first.
    pub top: Vec<(u32, f64)>,
}

/// `log_softmax` of `logits` (cast to f32, summed in f64) at `token`, and the `k` most likely.
pub fn token_logprob<T: Float>(logits: &[T], token: u32, k: usize) -> TokenLogprob {
    let s: Vec<f64> = logits.iter().map(|x| x.to_f64() as f32 as f64).collect();
    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + s.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    let mut top: Vec<(u32, f64)> = Vec::new();
    if k > 0 {
        let mut idx: Vec<usize> = (0..s.len()).collect();
        let k = k.min(s.len());
        idx.select_nth_unstable_by(k - 1, |&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        idx.truncate(k);
        idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        top = idx.into_iter().map(|i| (i as u32, s[i] - lse)).collect();
    }
    TokenLogprob {
        token,
        logprob: s[token as usize] - lse,
        top,
    }
}

/// Fields each endpoint accepts (OpenAI's, plus the sampling fields other local servers take).
const COMMON: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "n",
    "logprobs",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "user",
    "ignore_eos",
    "return_tokens_as_token_ids",
];
const COMPLETION: &[&str] = &["prompt", "echo", "best_of", "suffix"];
const CHAT: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "chat_template_kwargs",
];

/// A request body's fields, with `null` read as absent.
struct Fields(Map<String, Value>);

impl Fields {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn number(&self, k: &str) -> Result<Option<f64>, ApiError> {
        self.get(k)
            .map(|v| {
                v.as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| ApiError::invalid(k, format!("'{k}' must be a number, got {v}")))
            })
            .transpose()
    }

    fn integer(&self, k: &str) -> Result<Option<i64>, ApiError> {
        self.get(k)
            .map(|v| {
                v.as_i64().ok_or_else(|| {
                    ApiError::invalid(k, format!("'{k}' must be an integer, got {v}"))
                })
            })
            .transpose()
    }

    fn count(&self, k: &str) -> Result<Option<usize>, ApiError> {
        match self.integer(k)? {
            Some(n) if n < 0 => Err(ApiError::invalid(
                k,
                format!("'{k}' must be a non-negative integer, got {n}"),
            )),
            n => Ok(n.map(|n| n as usize)),
        }
    }

    fn boolean(&self, k: &str) -> Result<Option<bool>, ApiError> {
        self.get(k)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| ApiError::invalid(k, format!("'{k}' must be true or false")))
            })
            .transpose()
    }

    /// Refuses `k` unless it is absent or equal to its neutral value.
    fn refuse_unless(&self, k: &str, neutral: &Value, why: &str) -> Result<(), ApiError> {
        match self.get(k) {
            Some(v) if v != neutral && !(v.is_number() && v.as_f64() == neutral.as_f64()) => Err(
                ApiError::unsupported(k, format!("'{k}' is not supported by lockstep serve{why}")),
            ),
            _ => Ok(()),
        }
    }
}

/// Checks a request body for `kind` and resolves it against the model.
pub fn parse(kind: Kind, body: &[u8], info: &ModelInfo) -> Result<Request, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "We could not parse the JSON body of your request ({e})"
        ))
    })?;
    let Value::Object(map) = value else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    let own = match kind {
        Kind::Completion => COMPLETION,
        Kind::Chat => CHAT,
    };
    if let Some(k) = map
        .keys()
        .find(|k| !COMMON.contains(&k.as_str()) && !own.contains(&k.as_str()))
    {
        return Err(ApiError::invalid(
            k,
            format!("Unrecognized request argument supplied: {k}"),
        ));
    }
    let f = Fields(map);
    match f.get("model") {
        Some(Value::String(m)) if *m == info.id => {}
        Some(Value::String(m)) => {
            return Err(ApiError::not_found(
                format!(
                    "The model `{m}` does not exist (this server serves `{}`)",
                    info.id
                ),
                Some("model_not_found"),
            ))
        }
        Some(v) => {
            return Err(ApiError::invalid(
                "model",
                format!("'model' must be a string, got {v}"),
            ))
        }
        None => {
            return Err(ApiError::invalid(
                "model",
                "you must provide a model parameter",
            ))
        }
    }
    refuse_unsupported(kind, &f)?;
    let prompt = match kind {
        Kind::Completion => completion_prompt(&f, info)?,
        Kind::Chat => chat_prompt(&f, info)?,
    };
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= info.vocab_size) {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "token id {bad} is out of range (vocab_size is {})",
                info.vocab_size
            ),
        ));
    }
    if prompt.len() >= info.max_ctx {
        return Err(ApiError::invalid(
            if kind == Kind::Chat { "messages" } else { "prompt" },
            format!(
                "the prompt has {} tokens; this model's context is {} tokens (max_position_embeddings), which leaves no room to generate",
                prompt.len(),
                info.max_ctx
            ),
        ));
    }
    let stream = f.boolean("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(_) if !stream => {
            return Err(ApiError::invalid(
                "stream_options",
                "'stream_options' is only allowed with 'stream': true",
            ))
        }
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(ApiError::invalid(
                    "stream_options",
                    format!("'stream_options.include_usage' must be true or false, got {v}"),
                ))
            }
        },
        Some(v) => {
            return Err(ApiError::invalid(
                "stream_options",
                format!("'stream_options' must be an object, got {v}"),
            ))
        }
    };
    let opts = options(kind, &f, &info.defaults, prompt.len())?;
    Ok(Request {
        kind,
        prompt,
        opts,
        logprobs: logprobs(kind, &f)?,
        stream,
        include_usage,
        token_ids: f.boolean("return_tokens_as_token_ids")?.unwrap_or(false),
        echo: match (kind, f.boolean("echo")?.unwrap_or(false)) {
            (Kind::Completion, true) if stream => {
                return Err(ApiError::unsupported(
                    "echo",
                    "'echo' with 'stream' is not supported by lockstep serve",
                ))
            }
            (Kind::Completion, e) => e,
            (Kind::Chat, _) => false,
        },
    })
}

/// The fields lockstep does not implement: refused unless neutral.
fn refuse_unsupported(kind: Kind, f: &Fields) -> Result<(), ApiError> {
    let penalty = " (use repetition_penalty, transformers' multiplicative penalty)";
    f.refuse_unless("frequency_penalty", &Value::from(0), penalty)?;
    f.refuse_unless("presence_penalty", &Value::from(0), penalty)?;
    f.refuse_unless(
        "n",
        &Value::from(1),
        " (one choice per request; send several requests, they are batched)",
    )?;
    if let Some(Value::Object(o)) = f.get("logit_bias") {
        if !o.is_empty() {
            return Err(ApiError::unsupported(
                "logit_bias",
                "'logit_bias' is not supported by lockstep serve",
            ));
        }
    }
    if kind == Kind::Completion {
        f.refuse_unless("best_of", &Value::from(1), "")?;
        if f.get("suffix").is_some() {
            return Err(ApiError::unsupported(
                "suffix",
                "'suffix' is not supported by lockstep serve",
            ));
        }
    } else {
        for k in ["tools", "tool_choice"] {
            if f.get(k).is_some() {
                return Err(ApiError::unsupported(
                    k,
                    format!("'{k}' (tool calling) is not supported by lockstep serve"),
                ));
            }
        }
        if let Some(v) = f.get("response_format") {
            if v.get("type").and_then(Value::as_str) != Some("text") {
                return Err(ApiError::unsupported(
                    "response_format",
                    "only 'response_format': {\"type\": \"text\"} is supported by lockstep serve",
                ));
            }
        }
    }
    if let Some(v) = f.get("user") {
        if !v.is_string() {
            return Err(ApiError::invalid("user", "'user' must be a string"));
        }
    }
    Ok(())
}

/// A completion's `prompt`: a string, a list of token ids, or a list of one of either.
fn completion_prompt(f: &Fields, info: &ModelInfo) -> Result<Vec<u32>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "'prompt' must be a string, a list of token ids, or a list holding one of either",
        )
    };
    let mut p = f
        .get("prompt")
        .ok_or_else(|| ApiError::invalid("prompt", "you must provide a prompt"))?;
    if let Value::Array(a) = p {
        if a.len() == 1 && (a[0].is_string() || a[0].is_array()) {
            p = &a[0];
        } else if a.iter().any(|x| x.is_string() || x.is_array()) {
            return Err(ApiError::unsupported(
                "prompt",
                "several prompts in one request are not supported by lockstep serve (send several requests; they are batched)",
            ));
        }
    }
    let ids = match p {
        Value::String(s) => encode(info, s, "prompt")?,
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&n| n <= u32::MAX as u64)
                    .map(|n| n as u32)
            })
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if ids.is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "the prompt is empty (it tokenizes to no tokens)",
        ));
    }
    Ok(ids)
}

fn encode(info: &ModelInfo, text: &str, param: &str) -> Result<Vec<u32>, ApiError> {
    info.tokenizer
        .encode(text)
        .map_err(|e| ApiError::invalid(param, format!("cannot tokenize the {param}: {e}")))
}

/// A chat's `messages` rendered with the checkpoint's template (with the generation prompt, as
/// `lockstep generate --chat` renders them) and tokenized.
fn chat_prompt(f: &Fields, info: &ModelInfo) -> Result<Vec<u32>, ApiError> {
    let template = info.template.as_ref().ok_or_else(|| {
        ApiError::bad_request(format!(
            "the model `{}` has no chat template; use /v1/completions",
            info.id
        ))
    })?;
    let list = match f.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "messages",
                "'messages' must not be empty",
            ))
        }
        Some(_) => return Err(ApiError::invalid("messages", "'messages' must be a list")),
        None => return Err(ApiError::invalid("messages", "you must provide messages")),
    };
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let param = format!("messages.[{i}]");
        let Value::Object(o) = m else {
            return Err(ApiError::invalid(
                &param,
                format!("{param} must be an object"),
            ));
        };
        let role = match o.get("role") {
            Some(Value::String(r))
                if ["system", "developer", "user", "assistant", "tool"].contains(&r.as_str()) =>
            {
                r.clone()
            }
            other => {
                return Err(ApiError::invalid(
                    &format!("{param}.role"),
                    format!(
                    "{param}.role must be one of system, developer, user, assistant, tool; got {}",
                    other.unwrap_or(&Value::Null)
                ),
                ))
            }
        };
        let content = match o.get("content") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) if role == "assistant" => String::new(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::unsupported(
                                &format!("{param}.content"),
                                "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported by lockstep serve",
                            ))
                        }
                    }
                }
                text
            }
            _ => {
                return Err(ApiError::invalid(
                    &format!("{param}.content"),
                    format!("{param}.content must be a string or a list of text parts"),
                ))
            }
        };
        let mut msg = Message::new(&role, &content);
        for (k, v) in o {
            if k != "role" && k != "content" {
                msg.extra.insert(k.clone(), v.clone());
            }
        }
        messages.push(msg);
    }
    // Extra template variables, as vLLM takes them and transformers' `apply_chat_template(...,
    // **kwargs)` passes them (Qwen3's `{"enable_thinking": false}`).
    let vars = match f.get("chat_template_kwargs") {
        None => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                "chat_template_kwargs",
                "'chat_template_kwargs' must be an object of template variables",
            ))
        }
    };
    let text = template
        .render_with_vars(&messages, true, None, &vars)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    encode(info, &text, "messages")
}

/// `logprobs` (completions: how many alternatives; chat: a flag with `top_logprobs`).
fn logprobs(kind: Kind, f: &Fields) -> Result<Option<usize>, ApiError> {
    let check = |k: &str, n: usize| {
        if n > MAX_TOP_LOGPROBS {
            Err(ApiError::invalid(
                k,
                format!("'{k}' must be at most {MAX_TOP_LOGPROBS}, got {n}"),
            ))
        } else {
            Ok(n)
        }
    };
    match kind {
        Kind::Completion => f
            .count("logprobs")?
            .map(|n| check("logprobs", n))
            .transpose(),
        Kind::Chat => {
            let top = f.count("top_logprobs")?;
            match (f.boolean("logprobs")?.unwrap_or(false), top) {
                (true, top) => Ok(Some(check("top_logprobs", top.unwrap_or(0))?)),
                (false, Some(_)) => Err(ApiError::invalid(
                    "top_logprobs",
                    "'top_logprobs' needs 'logprobs': true",
                )),
                (false, None) => Ok(None),
            }
        }
    }
}

/// The decoding settings: the request over generation_config.json over transformers' defaults
/// (the rules of `lockstep generate`'s flags).
fn options(
    kind: Kind,
    f: &Fields,
    defaults: &GenerationDefaults,
    prompt_len: usize,
) -> Result<GenerateOptions, ApiError> {
    let mut s = defaults.sampling.clone();
    match f.number("temperature")? {
        Some(t) if t < 0.0 => {
            return Err(ApiError::invalid(
                "temperature",
                format!("'temperature' must be 0 (greedy) or positive, got {t}"),
            ))
        }
        Some(0.0) => s.do_sample = false,
        Some(t) => {
            s.do_sample = true;
            s.temperature = t as f32;
        }
        None => {}
    }
    match f.integer("top_k")? {
        // -1 is "off" for vLLM and llama.cpp clients; 0 is transformers' "off".
        Some(-1) | Some(0) => s.top_k = 0,
        Some(k) if k > 0 => s.top_k = k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("'top_k' must be -1, 0 (off) or positive, got {k}"),
            ))
        }
        None => {}
    }
    if let Some(p) = f.number("top_p")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("'top_p' must lie in (0, 1], got {p}"),
            ));
        }
        s.top_p = p as f32;
    }
    if let Some(p) = f.number("min_p")? {
        if !(0.0..=1.0).contains(&p) {
            return Err(ApiError::invalid(
                "min_p",
                format!("'min_p' must lie in [0, 1], got {p}"),
            ));
        }
        s.min_p = (p > 0.0).then_some(p as f32);
    }
    if let Some(r) = f.number("repetition_penalty")? {
        if r <= 0.0 {
            return Err(ApiError::invalid(
                "repetition_penalty",
                format!("'repetition_penalty' must be a positive number, got {r}"),
            ));
        }
        s.repetition_penalty = r as f32;
    }
    s.validate()
        .map_err(|e| ApiError::invalid(e.param, e.msg))?;
    let stop = match f.get("stop") {
        None => vec![],
        Some(Value::String(t)) => vec![t.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::invalid("stop", "'stop' must be a string or a list of strings")
            })?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "'stop' must be a string or a list of strings",
            ))
        }
    };
    let max_key = if kind == Kind::Chat && f.get("max_completion_tokens").is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_new_tokens = match (
        f.count(max_key)?,
        defaults.max_new_tokens,
        defaults.max_length,
    ) {
        (Some(n), _, _) => n,
        (None, Some(n), _) => n,
        (None, None, Some(len)) => len.saturating_sub(prompt_len),
        (None, None, None) => DEFAULT_MAX_TOKENS,
    };
    let seed = match f.integer("seed")? {
        Some(s) => s as u64,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    };
    Ok(GenerateOptions {
        max_new_tokens,
        eos_token_ids: defaults.eos_token_ids.clone(),
        ignore_eos: f.boolean("ignore_eos")?.unwrap_or(false),
        stop,
        sampling: s,
        seed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(
        not(feature = "reference-tests"),
        ignore = "needs the fixtures: bash scripts/test.sh"
    )]
    fn echo_is_a_completion_flag_refused_with_stream() {
        let tok = std::sync::Arc::new(
            Tokenizer::from_dir(
                &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../fixtures/models/qwen2-gqa"),
            )
            .expect("fixture qwen2-gqa (bash scripts/fixtures.sh)"),
        );
        let info = ModelInfo {
            id: "m".into(),
            created: 0,
            defaults: GenerationDefaults {
                sampling: lockstep_engine::sampling::SamplingParams::greedy(),
                max_new_tokens: None,
                max_length: None,
                eos_token_ids: vec![],
                source: "test",
            },
            template: None,
            tokenizer: tok,
            vocab_size: 2048,
            max_ctx: 64,
        };
        let req = |body: &str| parse(Kind::Completion, body.as_bytes(), &info);
        let r = req(r#"{"model":"m","prompt":[1,2],"echo":true,"logprobs":2,"return_tokens_as_token_ids":true}"#).unwrap();
        assert!(r.echo && r.token_ids && r.logprobs == Some(2));
        assert!(!req(r#"{"model":"m","prompt":[1,2]}"#).unwrap().echo);
        let e = req(r#"{"model":"m","prompt":[1],"echo":true,"stream":true}"#).unwrap_err();
        assert!(format!("{e:?}").contains("'echo' with 'stream'"), "{e:?}");
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_the_top_first() {
        let lp = token_logprob(&[1.0f32, 3.0, 2.0, 3.0], 2, 2);
        let lse = (1f64.exp() + 3f64.exp() * 2.0 + 2f64.exp()).ln();
        assert!((lp.logprob - (2.0 - lse)).abs() < 1e-12);
        // Ties: the lower id first.
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!(token_logprob(&[0.0f32; 3], 0, 0).top.is_empty());
    }
}
