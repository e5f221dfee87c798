//! Reading a completion's log-probabilities, whatever OpenAI-compatible dialect the server
//! speaks, into [`ServerStep`]s with token ids:
//!
//! - OpenAI's legacy completions form: `tokens`, `token_logprobs`, `top_logprobs` (one object
//!   per step, token text → logprob);
//! - the `content` form (chat, and llama.cpp's completions): `[{token, logprob, id?,
//!   top_logprobs: [{token, logprob, id?}]}]`.
//!
//! A token is known by its `id` when the server gives one, by `token_id:N` (vLLM's and lockstep's
//! `return_tokens_as_token_ids`), else by its text through the model's vocabulary, when exactly
//! one token decodes to that text. An entry whose text names several tokens (a lone byte of a
//! multi-byte character) is left out and counted.

use lockstep_verify::endpoint::ServerStep;
use serde_json::Value;
use std::collections::HashMap;

/// Token text → the ids that decode to it (built on first use).
pub struct Vocab<'a> {
    decode: &'a dyn Fn(u32) -> Option<String>,
    size: usize,
    map: Option<HashMap<String, Vec<u32>>>,
}

impl<'a> Vocab<'a> {
    /// A vocabulary of `size` ids, each decoded alone by `decode`.
    pub fn new(size: usize, decode: &'a dyn Fn(u32) -> Option<String>) -> Self {
        Vocab {
            decode,
            size,
            map: None,
        }
    }

    /// The id `text` names, when exactly one token has it; `token_id:N` is `N`.
    pub fn resolve(&mut self, text: &str) -> Option<u32> {
        if let Some(n) = text.strip_prefix("token_id:") {
            return n.parse().ok();
        }
        let (decode, size) = (self.decode, self.size);
        let map = self.map.get_or_insert_with(|| {
            let mut m: HashMap<String, Vec<u32>> = HashMap::new();
            for id in 0..size as u32 {
                if let Some(t) = decode(id) {
                    m.entry(t).or_default().push(id);
                }
            }
            m
        });
        match map.get(text).map(Vec::as_slice) {
            Some([one]) => Some(*one),
            _ => None,
        }
    }
}

/// One entry's id: its `id` field, else its token text resolved.
fn entry_id(e: &Value, vocab: &mut Vocab) -> Option<u32> {
    if let Some(id) = e.get("id").and_then(Value::as_u64) {
        return u32::try_from(id).ok();
    }
    vocab.resolve(e.get("token")?.as_str()?)
}

/// The steps of one completion choice. `prompt` is what was sent; `echoed` says whether the
/// log-probabilities start with the prompt's tokens (`echo: true`). The prompt's own tokens
/// keep the ids sent; the first prompt token (which nothing predicts) is left out. Generated
/// steps stop at the first whose token cannot be identified (its text names several tokens):
/// what follows it is on a context lockstep cannot rebuild; the count of steps cut is returned.
pub fn parse_steps(
    logprobs: &Value,
    prompt: &[u32],
    echoed: bool,
    vocab: &mut Vocab,
) -> Result<(Vec<ServerStep>, usize), String> {
    // (token text or id entry, its logprob, its top list as (entry, logprob))
    type Raw = (Option<u32>, Option<f64>, Vec<(Option<u32>, f64)>);
    let mut raw: Vec<Raw> = vec![];
    if let Some(content) = logprobs.get("content").and_then(Value::as_array) {
        for e in content {
            let top = e
                .get("top_logprobs")
                .and_then(Value::as_array)
                .map(|t| {
                    t.iter()
                        .filter_map(|x| Some((entry_id(x, vocab), x.get("logprob")?.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default();
            raw.push((
                entry_id(e, vocab),
                e.get("logprob").and_then(Value::as_f64),
                top,
            ));
        }
    } else if let Some(tokens) = logprobs.get("tokens").and_then(Value::as_array) {
        let lps = logprobs.get("token_logprobs").and_then(Value::as_array);
        let tops = logprobs.get("top_logprobs").and_then(Value::as_array);
        for (i, t) in tokens.iter().enumerate() {
            let id = t.as_str().and_then(|t| vocab.resolve(t));
            let lp = lps.and_then(|l| l.get(i)).and_then(Value::as_f64);
            let mut top: Vec<(Option<u32>, f64)> = tops
                .and_then(|t| t.get(i))
                .and_then(Value::as_object)
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, v)| Some((vocab.resolve(k), v.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default();
            top.sort_by(|a, b| b.1.total_cmp(&a.1));
            raw.push((id, lp, top));
        }
    } else {
        return Err(
            "the answer's `logprobs` has neither `tokens` (OpenAI completions) nor `content`: the server does not return log-probabilities".into(),
        );
    }
    let skip = if echoed { 0 } else { prompt.len() };
    if echoed && raw.len() < prompt.len() {
        return Err(format!(
            "echo returned {} log-probability entries for a {}-token prompt",
            raw.len(),
            prompt.len()
        ));
    }
    let total_generated = (raw.len() + skip).saturating_sub(prompt.len());
    let mut steps = vec![];
    let mut cut = 0;
    for (i, (id, lp, top)) in raw.into_iter().enumerate() {
        let position = i + skip;
        let generated = position >= prompt.len();
        if let (false, Some(echoed)) = (generated, id) {
            if echoed != prompt[position] {
                return Err(format!(
                    "the server echoed token {echoed} at prompt position {position}, where the prompt has {}: it tokenized or received the prompt differently",
                    prompt[position]
                ));
            }
        }
        if position == 0 {
            continue;
        }
        let token = if generated {
            id
        } else {
            Some(prompt[position])
        };
        if generated && token.is_none() {
            cut = total_generated - (position - prompt.len());
            break;
        }
        let unresolved = top.iter().filter(|e| e.0.is_none()).count();
        steps.push(ServerStep {
            position,
            generated,
            token,
            logprob: lp,
            top: top.into_iter().filter_map(|(t, l)| Some((t?, l))).collect(),
            unresolved,
        });
    }
    Ok((steps, cut))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode(id: u32) -> Option<String> {
        Some(match id {
            0..=2 => ["a", "b", "c"][id as usize].to_string(),
            _ => "\u{fffd}".to_string(), // 3 and 4 share a text
        })
    }

    #[test]
    fn legacy_form_by_text_and_by_token_id() {
        let d = decode;
        let mut v = Vocab::new(5, &d);
        let lp = json!({
            "tokens": ["b", "token_id:4"],
            "token_logprobs": [-0.1, -0.2],
            "top_logprobs": [{"a": -2.0, "b": -0.1, "\u{fffd}": -3.0}, {"token_id:4": -0.2}],
        });
        let (steps, cut) = parse_steps(&lp, &[0, 2], false, &mut v).unwrap();
        assert_eq!(cut, 0);
        assert_eq!(steps.len(), 2);
        assert_eq!((steps[0].position, steps[0].token), (2, Some(1)));
        // Sorted most likely first; the shared text left out and counted.
        assert_eq!(steps[0].top, vec![(1, -0.1), (0, -2.0)]);
        assert_eq!(steps[0].unresolved, 1);
        assert_eq!((steps[1].token, steps[1].logprob), (Some(4), Some(-0.2)));
    }

    #[test]
    fn an_ambiguous_generated_token_cuts_the_rest() {
        let d = decode;
        let mut v = Vocab::new(5, &d);
        let lp = json!({"tokens": ["a", "\u{fffd}", "b"], "token_logprobs": [-1.0, -1.0, -1.0], "top_logprobs": [{}, {}, {}]});
        let (steps, cut) = parse_steps(&lp, &[0], false, &mut v).unwrap();
        assert_eq!((steps.len(), cut), (1, 2));
    }

    #[test]
    fn content_form_with_ids_and_echo() {
        let d = decode;
        let mut v = Vocab::new(5, &d);
        let lp = json!({"content": [
            {"token": "a", "logprob": null, "top_logprobs": []},
            {"token": "x", "id": 2, "logprob": -0.5, "top_logprobs": [{"token": "?", "id": 2, "logprob": -0.5}]},
            {"token": "\u{fffd}", "id": 3, "logprob": -0.7, "top_logprobs": []},
        ]});
        let (steps, cut) = parse_steps(&lp, &[0, 2], true, &mut v).unwrap();
        assert_eq!(cut, 0);
        assert_eq!(steps.len(), 2);
        assert!(!steps[0].generated && steps[0].position == 1 && steps[0].token == Some(2));
        assert_eq!(steps[0].top, vec![(2, -0.5)]);
        assert!(steps[1].generated && steps[1].token == Some(3));
        assert!(parse_steps(&json!({"content": []}), &[0, 1], true, &mut v).is_err());
        // An echoed prompt token other than the one sent.
        let e = parse_steps(&lp, &[0, 1], true, &mut v).unwrap_err();
        assert!(e.contains("echoed token 2 at prompt position 1"), "{e}");
        assert!(parse_steps(&json!({"x": 1}), &[0], false, &mut v).is_err());
    }
}
