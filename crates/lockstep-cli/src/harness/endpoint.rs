//! The endpoint pipeline of `lockstep verify --endpoint URL`: a black-box OpenAI-compatible
//! server (lockstep serve, vLLM, SGLang, llama.cpp's server, TGI...) asked for greedy completions
//! with top-k log-probabilities, judged against the reference and the f64 oracle run locally on
//! the server's own sequences ([`lockstep_verify::endpoint`]).

use super::endpoint_response::{parse_steps, Vocab};
use super::http::{request, BaseUrl};
use super::inputs::Input;
use super::reference::{Reference, TraceJob};
use super::{create_work_dir, read_reference_trace, HarnessError, HarnessResult};
use lockstep_verify::endpoint::{endpoint_phases, judge_endpoint, LogitRows, ServerStep};
use lockstep_verify::{Phase, Tier, VerifyOutcome};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::PathBuf;

/// Options of verifying an endpoint.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    /// The server's base URL (`http://HOST:PORT/v1`).
    pub url: String,
    /// The checkpoint the server is said to serve (the reference runs it).
    pub model: PathBuf,
    /// The tier the server is judged in (its declared compute dtype).
    pub tier: Tier,
    /// The inputs (their texts are tokenized here and sent as token ids).
    pub inputs: Vec<Input>,
    /// New tokens per completion.
    pub max_tokens: usize,
    /// Top log-probabilities asked for per step.
    pub top_logprobs: usize,
    /// Scratch folder for the reference traces.
    pub work_dir: PathBuf,
}

/// What the server is and how it answers.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// The URL as given.
    pub url: String,
    /// The model id from `/models`.
    pub model_id: String,
    /// `owned_by` from `/models`, when given.
    pub owned_by: Option<String>,
    /// Whether `echo` returned the prompt's log-probabilities.
    pub echo: bool,
    /// Whether the server accepted `return_tokens_as_token_ids`.
    pub token_ids: bool,
    /// How its answers name tokens: `token_id:N`, `id` fields, or (None) by text only.
    pub ids_in_answer: Option<&'static str>,
    /// Whether the server needed llama.cpp's `n_probs` to return log-probabilities.
    pub n_probs: bool,
    /// Whether the prompts go as text (the server refused token ids): its tokenization is then
    /// taken to be the model tokenizer's (checked against the echoed tokens when it echoes).
    pub text_prompt: bool,
}

/// The request extras tried, most informative first: prompt log-probabilities through `echo`,
/// token ids through `return_tokens_as_token_ids` (vLLM's; lockstep serve takes it too); each
/// round again with llama.cpp's `n_probs` when no round without it returned log-probabilities.
const PROBES: [(bool, bool); 4] = [(true, true), (true, false), (false, true), (false, false)];

fn completion_body(
    id: &str,
    prompt: Value,
    o: &EndpointOptions,
    (echo, token_ids): (bool, bool),
    n_probs: bool,
) -> Value {
    let mut b = json!({
        "model": id,
        "prompt": prompt,
        "max_tokens": o.max_tokens,
        "temperature": 0,
        "logprobs": o.top_logprobs,
    });
    if echo {
        b["echo"] = json!(true);
    }
    if token_ids {
        b["return_tokens_as_token_ids"] = json!(true);
    }
    if n_probs {
        b["n_probs"] = json!(o.top_logprobs);
    }
    b
}

/// The `logprobs` object of a completion answer, or why there is none.
fn choice_logprobs(v: &Value) -> Result<&Value, String> {
    let choice = v
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or("the answer has no `choices` (not an OpenAI completion)")?;
    choice
        .get("logprobs")
        .filter(|l| !l.is_null())
        .ok_or_else(|| "the completion carries no `logprobs`".to_string())
}

/// The server's error message, for one-line reports.
fn error_message(status: u16, v: Option<&Value>, body: &str) -> String {
    let msg = v
        .and_then(|v| v.get("error"))
        .and_then(|e| e.get("message").or(Some(e)))
        .map(|m| m.as_str().map_or(m.to_string(), str::to_string));
    format!(
        "HTTP {status}: {}",
        super::short(&msg.unwrap_or_else(|| body.to_string()))
    )
}

/// Asks `/models` and probes which completion extras the server takes.
fn probe(
    base: &BaseUrl,
    o: &EndpointOptions,
    prompt: &[u32],
    text: Option<&str>,
    progress: &mut dyn FnMut(&str),
) -> HarnessResult<ServerInfo> {
    let url = base.display();
    progress(&format!("asking {url}/models"));
    let r = request(base, "GET", "/models", None)?;
    let v = r.json(&format!("GET {url}/models"))?;
    // The model named after the checkpoint's folder when the server lists several, else the first.
    let name = o
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let listed = v.get("data").and_then(Value::as_array);
    let named = listed.and_then(|l| {
        l.iter()
            .find(|m| m.get("id").and_then(Value::as_str) == name.as_deref())
    });
    let first = named.or(listed.and_then(|l| l.first())).ok_or_else(|| {
        HarnessError::input(format!(
            "GET {url}/models: not an OpenAI-compatible answer (no `data` list of models): {}",
            super::short(&r.body)
        ))
    })?;
    let model_id = first
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            HarnessError::input(format!("GET {url}/models: the first model has no `id`"))
        })?
        .to_string();
    let owned_by = first
        .get("owned_by")
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut last = String::new();
    // Token-id prompts first; the text (when it is the model's own) only if every form is refused.
    let forms: Vec<(bool, Value)> = std::iter::once((false, json!(prompt)))
        .chain(text.map(|t| (true, json!(t))))
        .collect();
    for (text_prompt, prompt_value, n_probs, extras) in forms.iter().flat_map(|(t, p)| {
        [false, true]
            .into_iter()
            .flat_map(move |n| PROBES.into_iter().map(move |e| (*t, p.clone(), n, e)))
    }) {
        progress(&format!(
            "probing /completions ({} prompt, echo: {}, token ids: {}{})",
            if text_prompt { "text" } else { "token-id" },
            extras.0,
            extras.1,
            if n_probs { ", n_probs" } else { "" }
        ));
        let body = completion_body(&model_id, prompt_value, o, extras, n_probs);
        let r = request(base, "POST", "/completions", Some(&body))?;
        let v = serde_json::from_str::<Value>(&r.body).ok();
        if r.status != 200 {
            last = error_message(r.status, v.as_ref(), &r.body);
            continue;
        }
        let v = r.json(&format!("POST {url}/completions"))?;
        let lp = match choice_logprobs(&v) {
            Ok(lp) => lp,
            Err(e) => {
                last = e;
                continue;
            }
        };
        // A server that ignores `echo` returns the generated entries only.
        let entries = lp
            .get("content")
            .or(lp.get("tokens"))
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let echoed = match v
            .pointer("/usage/completion_tokens")
            .and_then(Value::as_u64)
        {
            Some(n) => entries >= prompt.len() + n as usize,
            None => entries > o.max_tokens,
        };
        let first_entry = lp
            .get("content")
            .and_then(|c| c.get(0))
            .or(lp.get("tokens").and_then(|t| t.get(0)));
        let ids_in_answer = match first_entry {
            Some(e) if e.get("id").is_some_and(Value::is_u64) => Some("`id` fields"),
            Some(e)
                if e.get("token")
                    .unwrap_or(e)
                    .as_str()
                    .is_some_and(|t| t.starts_with("token_id:")) =>
            {
                Some("return_tokens_as_token_ids")
            }
            _ => None,
        };
        return Ok(ServerInfo {
            ids_in_answer,
            url: url.clone(),
            model_id,
            owned_by,
            echo: extras.0 && echoed,
            token_ids: extras.1,
            n_probs,
            text_prompt,
        });
    }
    Err(HarnessError::input(format!(
        "POST {url}/completions gave no greedy completion with log-probabilities: {last}"
    )))
}

/// Runs the endpoint verification: probe, one completion per input, the reference and oracle on
/// each sequence the server produced, and the judgement.
pub fn run_endpoint_verify(
    o: &EndpointOptions,
    reference: &mut dyn Reference,
    progress: &mut dyn FnMut(&str),
) -> HarnessResult<(VerifyOutcome, ServerInfo)> {
    let base = BaseUrl::parse(&o.url)?;
    create_work_dir(&o.work_dir)?;
    let tok = lockstep_engine::Tokenizer::from_dir(&o.model)?;
    let config = lockstep_engine::ModelConfig::from_file(&o.model.join("config.json"))?;
    let prompts: Vec<Vec<u32>> = o
        .inputs
        .iter()
        .map(|i| tok.encode(&i.text))
        .collect::<Result<_, _>>()?;
    // A small test model with a full-size tokenizer: its ids folded into the model's vocabulary
    // (the prompts go as token ids, so any ids do).
    let vocab_n = config.vocab_size as u32;
    let folded = prompts.iter().flatten().any(|&t| t >= vocab_n);
    let prompts: Vec<Vec<u32>> = prompts
        .into_iter()
        .map(|p| p.into_iter().map(|t| t % vocab_n.max(1)).collect())
        .collect();
    if folded {
        progress(&format!(
            "the tokenizer's ids exceed the model's {vocab_n}-token vocabulary (a small test model): folded into it"
        ));
    }
    let first = prompts
        .iter()
        .find(|p| !p.is_empty())
        .ok_or_else(|| HarnessError::input("no input tokenizes to any token"))?;
    let first_text = o
        .inputs
        .iter()
        .zip(&prompts)
        .find(|(_, p)| !p.is_empty())
        .map(|(i, _)| i.text.as_str());
    let info = probe(&base, o, first, first_text.filter(|_| !folded), progress)?;
    let extras = (info.echo, info.token_ids);
    let decode = |id: u32| tok.decode(&[id]).ok();
    let mut vocab = Vocab::new(config.vocab_size, &decode);
    let url = base.display();

    // One completion per input.
    let mut runs: Vec<(String, Vec<u32>, Vec<ServerStep>, usize)> = vec![];
    for (input, prompt) in o.inputs.iter().zip(&prompts) {
        if prompt.is_empty() {
            continue;
        }
        progress(&format!(
            "{}: greedy completion from the server",
            input.label
        ));
        let prompt_value = if info.text_prompt {
            json!(input.text)
        } else {
            json!(prompt)
        };
        let body = completion_body(&info.model_id, prompt_value, o, extras, info.n_probs);
        let r = request(&base, "POST", "/completions", Some(&body))?;
        let what = format!("POST {url}/completions ({})", input.label);
        if r.status != 200 {
            let v = serde_json::from_str::<Value>(&r.body).ok();
            return Err(HarnessError::input(format!(
                "{what}: {}",
                error_message(r.status, v.as_ref(), &r.body)
            )));
        }
        let v = r.json(&what)?;
        let lp = choice_logprobs(&v).map_err(|e| HarnessError::input(format!("{what}: {e}")))?;
        let (steps, cut) = parse_steps(lp, prompt, info.echo, &mut vocab)
            .map_err(|e| HarnessError::input(format!("{what}: {e}")))?;
        if let Some(bad) = steps
            .iter()
            .filter_map(|s| s.token)
            .find(|&t| t as usize >= config.vocab_size)
        {
            return Err(HarnessError::input(format!(
                "{what}: token id {bad} is outside the model's vocabulary ({} ids): is the server serving {}?",
                config.vocab_size,
                o.model.display()
            )));
        }
        runs.push((input.label.clone(), prompt.clone(), steps, cut));
    }

    // The reference and the oracle on each sequence the server produced.
    let sequence = |prompt: &[u32], steps: &[ServerStep]| {
        let mut s = prompt.to_vec();
        s.extend(steps.iter().filter(|s| s.generated).filter_map(|s| s.token));
        s
    };
    let path = |i: usize, dt: &str| o.work_dir.join(format!("endpoint-{i}-{dt}.safetensors"));
    let dtypes: Vec<&str> = if o.tier == Tier::F64 {
        vec!["f64"]
    } else {
        vec!["f64", o.tier.as_str()]
    };
    let mut jobs = vec![];
    for (i, (_, prompt, steps, _)) in runs.iter().enumerate() {
        for dt in &dtypes {
            jobs.push(TraceJob {
                model: o.model.clone(),
                tokens: sequence(prompt, steps),
                dtype: dt.to_string(),
                out: path(i, dt),
            });
        }
    }
    progress("running the reference (transformers) and the f64 oracle on the server's sequences");
    reference.traces(&jobs)?;
    progress(&format!("judging in the {} tier", o.tier));
    let mut judgements = vec![];
    let mut notes = String::new();
    for (i, (label, prompt, steps, cut)) in runs.iter().enumerate() {
        let logits = |dt: &str| -> HarnessResult<(Vec<f64>, usize)> {
            let t = read_reference_trace(&path(i, dt))?;
            let l = t
                .get("logits")
                .ok_or_else(|| HarnessError::reference("its trace has no logits"))?;
            Ok((l.data.to_f64(), *l.shape.last().unwrap_or(&1)))
        };
        let (oracle, vocab_o) = logits("f64")?;
        let (reference_l, vocab_r) = if o.tier == Tier::F64 {
            (oracle.clone(), vocab_o)
        } else {
            logits(o.tier.as_str())?
        };
        let mut j = judge_endpoint(
            label,
            prompt.len(),
            steps,
            o.tier,
            LogitRows {
                data: &reference_l,
                vocab: vocab_r,
            },
            LogitRows {
                data: &oracle,
                vocab: vocab_o,
            },
        );
        if *cut > 0 {
            let _ = writeln!(
                notes,
                "- {label}: the last {cut} generated token(s) not judged: the server named a token by a text several tokens share (it does not return token ids)"
            );
            j.label = format!("{label} (first {} tokens)", j.generated);
        }
        judgements.push(j);
    }
    let prompt_lp = if info.echo {
        "judged (echo: true)"
    } else {
        "not returned by the server (echo refused or ignored): generated steps only"
    };
    let mut phases = vec![server_phase(&info, o)];
    phases.extend(endpoint_phases(o.tier, &judgements, prompt_lp));
    if !notes.is_empty() {
        if let Some(p) = phases.last_mut() {
            let d = p.details.take().unwrap_or_default();
            p.details = Some(format!("{d}\n{notes}"));
        }
    }
    Ok((VerifyOutcome::new(phases, vec![]), info))
}

/// The first phase: the server named, and what it supports.
fn server_phase(info: &ServerInfo, o: &EndpointOptions) -> Phase {
    Phase::pass(
        "endpoint",
        format!(
            "{} serves `{}`{}; greedy completions of {}, {} new tokens, top-{} log-probabilities; prompt log-probabilities (echo): {}; token ids in log-probabilities: {}",
            info.url,
            info.model_id,
            info.owned_by
                .as_deref()
                .map_or(String::new(), |b| format!(" (owned_by `{b}`)")),
            if info.text_prompt {
                "text prompts (token ids refused; the server's tokenization taken to be the model tokenizer's)"
            } else {
                "token-id prompts"
            },
            o.max_tokens,
            o.top_logprobs,
            if info.echo { "yes" } else { "no" },
            match info.ids_in_answer {
                Some(how) => format!("yes ({how})"),
                None => "no (token texts mapped through the vocabulary)".into(),
            }
        ) + if info.n_probs {
            "; log-probabilities through llama.cpp's n_probs"
        } else {
            ""
        },
    )
}
