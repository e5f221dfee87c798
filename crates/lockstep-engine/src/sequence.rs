//! One sequence being generated, and the decode step of sequences that each have their own cache.
//!
//! [`Sequence`] is one row of a generation: its sampler (settings and random stream), context,
//! streamed text and stop state. [`crate::generate::generate_batch`] drives a fixed batch of
//! them; a server drives rows that come and go (continuous batching) with [`decode_step`], which
//! runs one new token per row through every matmul together while each row attends over its own
//! [`KvCache`] at its own position. Every kernel on a row's path computes that row the same way
//! whatever else is in the batch (matmul sums in a fixed order per token, attention and norms per
//! row), so a row's logits, and therefore its tokens, are bit for bit what it gets alone. (The
//! AMX tiles of the faithful bf16 tier, which sum in another order, serve prefills only: a
//! step of one new token per row is a [`crate::kernels::matmul::PassKind::Decode`] pass
//! however many rows it has.)

use crate::error::{EngineError, Result};
use crate::generate::{FinishReason, GenerateOptions, StreamDecoder};
use crate::kernels::Float;
use crate::model::{KvCache, LogitsFor, Model};
use crate::sampling::Sampler;

/// One row of a generation in progress: its sampler, context, text and stop state.
#[derive(Debug, Clone)]
pub struct Sequence {
    sampler: Sampler,
    stream: StreamDecoder,
    prompt_len: usize,
    context: Vec<u32>,
    text: String,
    printed: usize,
    finish: Option<FinishReason>,
}

impl Sequence {
    /// A sequence about to generate from `prompt` with `opts` (its own random stream seeded with
    /// `opts.seed`). With `max_new_tokens` 0 it is finished from the start.
    pub fn new(prompt: Vec<u32>, opts: &GenerateOptions) -> Self {
        Sequence {
            sampler: Sampler::new(opts.sampling.clone(), opts.seed),
            stream: StreamDecoder::new(),
            prompt_len: prompt.len(),
            context: prompt,
            text: String::new(),
            printed: 0,
            finish: (opts.max_new_tokens == 0).then_some(FinishReason::Length),
        }
    }

    /// The prompt and the tokens generated so far.
    pub fn context(&self) -> &[u32] {
        &self.context
    }

    /// The prompt's length.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// The generated tokens (an EOS that ended the generation included).
    pub fn generated(&self) -> &[u32] {
        &self.context[self.prompt_len..]
    }

    /// The text so far (special tokens skipped, cut before a stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Why the sequence ended, once it has.
    pub fn finish(&self) -> Option<FinishReason> {
        self.finish
    }

    /// `(prompt, generated, text, finish)`; a sequence stopped before it finished counts as
    /// [`FinishReason::Length`].
    pub fn into_parts(self) -> (Vec<u32>, Vec<u32>, String, FinishReason) {
        let mut prompt = self.context;
        let generated = prompt.split_off(self.prompt_len);
        (
            prompt,
            generated,
            self.text,
            self.finish.unwrap_or(FinishReason::Length),
        )
    }

    /// Takes the next token from the last position's `logits`; returns the text that became
    /// printable (never half a character, never a possible start of a stop string).
    pub fn step<T: Float>(
        &mut self,
        logits: &[T],
        opts: &GenerateOptions,
        max_ctx: usize,
        decode: &impl Fn(&[u32]) -> Result<String>,
    ) -> Result<String> {
        // transformers casts the last position's logits to float32 before any processor.
        let mut scores: Vec<f32> = logits.iter().map(|x| x.to_f64() as f32).collect();
        let next = self.sampler.next_token(&mut scores, &self.context);
        self.context.push(next);
        let is_eos = !opts.ignore_eos && opts.eos_token_ids.contains(&next);
        if !is_eos {
            let piece = self.stream.push(next, decode)?;
            self.text.push_str(&piece);
        }
        let stop_at = opts
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text.find(s.as_str()))
            .min();
        let done = if let Some(pos) = stop_at {
            self.text.truncate(pos);
            Some(FinishReason::Stop)
        } else if is_eos {
            Some(FinishReason::Eos)
        } else if self.generated().len() == opts.max_new_tokens {
            Some(FinishReason::Length)
        } else if self.context.len() >= max_ctx {
            Some(FinishReason::Context)
        } else {
            None
        };
        if matches!(done, Some(f) if f != FinishReason::Stop) {
            let tail = self.stream.finish(decode)?;
            self.text.push_str(&tail);
        }
        self.finish = done;
        let safe = match done {
            Some(_) => self.text.len(),
            None => self.text.len() - stop_holdback(&self.text, &opts.stop),
        };
        let out = if safe > self.printed {
            self.text[self.printed..safe].to_string()
        } else {
            String::new()
        };
        self.printed = self.printed.max(safe);
        Ok(out)
    }
}

/// The byte length of the longest suffix of `text` that is a proper prefix of some stop string
/// (text that might still become a stop string and must not be printed yet).
fn stop_holdback(text: &str, stop: &[String]) -> usize {
    let mut hold = 0;
    for s in stop {
        for (i, _) in s.char_indices().skip(1) {
            if i > hold && text.ends_with(&s[..i]) {
                hold = i;
            }
        }
    }
    hold
}

/// One decode step of rows that each have their own cache: `tokens[b]` is row `b`'s next token
/// at position `caches[b].len()`; returns the logits `[rows][vocab]` and appends each row's keys
/// and values to its cache. Row `b`'s logits are bit for bit those of
/// [`Model::forward_last`] over `tokens[b]` with `caches[b]` alone.
pub fn decode_step<T: Float>(
    model: &Model,
    tokens: &[u32],
    caches: &mut [KvCache<T>],
) -> Result<Vec<T>> {
    if tokens.len() != caches.len() || tokens.is_empty() {
        return Err(EngineError::Input(format!(
            "a decode step needs one token per cache, got {} tokens for {} caches",
            tokens.len(),
            caches.len()
        )));
    }
    for (t, c) in tokens.iter().zip(caches.iter()) {
        model.check_tokens(std::slice::from_ref(t), c.len())?;
    }
    let positions: Vec<usize> = caches.iter().map(KvCache::len).collect();
    model.forward_rows(
        tokens,
        &positions,
        caches,
        None,
        None,
        &mut crate::NoObserver,
        LogitsFor::Last,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holdback_covers_partial_stop_strings() {
        let stop = vec!["\nUser:".to_string(), "END".to_string()];
        assert_eq!(stop_holdback("abc\nUs", &stop), 3);
        assert_eq!(stop_holdback("abcEN", &stop), 2);
        assert_eq!(stop_holdback("abc", &stop), 0);
    }
}
