//! Streaming detokenization that never prints half a character.

use crate::error::Result;

/// Incremental detokenization that never prints half a character.
///
/// It decodes a small window of the growing id list (the ids of the last printed piece plus the
/// new ones), prints only the text beyond what the window's first part decodes to, and holds the
/// text back while it ends in U+FFFD (a multi-byte character split across tokens). The window keeps
/// decoders that treat the first token specially (SentencePiece's leading space) consistent.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id; returns the newly complete text (possibly empty).
    pub fn push(&mut self, id: u32, decode: &impl Fn(&[u32]) -> Result<String>) -> Result<String> {
        self.ids.push(id);
        self.step(decode, false)
    }

    /// Everything not yet returned, including a trailing U+FFFD that will never complete.
    pub fn finish(&mut self, decode: &impl Fn(&[u32]) -> Result<String>) -> Result<String> {
        self.step(decode, true)
    }

    fn step(&mut self, decode: &impl Fn(&[u32]) -> Result<String>, flush: bool) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        // A character is at most 4 bytes, so more pending tokens than that can never complete
        // one: print them (with U+FFFD) instead of re-decoding a window that grows forever.
        if !flush
            && full.ends_with('\u{FFFD}')
            && self.ids.len() - self.read_offset <= MAX_PENDING_IDS
        {
            return Ok(String::new());
        }
        let new = if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            full[prefix.len()..].to_string()
        } else if full.len() <= prefix.len() {
            // Nothing visible yet (e.g. a skipped special token): keep the window.
            if flush {
                self.read_offset = self.ids.len();
            }
            return Ok(String::new());
        } else {
            // The prefix decodes differently inside the longer window: print from the first
            // differing character.
            let common = full
                .char_indices()
                .zip(prefix.chars())
                .find(|((_, a), b)| a != b)
                .map(|((i, _), _)| i)
                .unwrap_or(prefix.len().min(full.len()));
            full[common..].to_string()
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(new)
    }
}

/// Tokens [`StreamDecoder`] holds back while their text ends in an incomplete character.
const MAX_PENDING_IDS: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level "tokenizer": each id is one byte; decoding is lossy UTF-8 like byte-level BPE.
    fn bytes(ids: &[u32]) -> Result<String> {
        let b: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    #[test]
    fn stream_decoder_never_splits_a_character() {
        let text = "né 😀 日本";
        let mut d = StreamDecoder::new();
        let mut out = String::new();
        let mut pieces = vec![];
        for b in text.bytes() {
            let piece = d.push(b as u32, &bytes).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
            out.push_str(&piece);
            pieces.push(piece);
        }
        out.push_str(&d.finish(&bytes).unwrap());
        assert_eq!(out, text);
        // The emoji's 4 bytes come out as one piece, on its last byte.
        assert!(pieces.contains(&"😀".to_string()), "{pieces:?}");
    }

    #[test]
    fn stream_decoder_flushes_an_incomplete_tail() {
        let mut d = StreamDecoder::new();
        assert_eq!(d.push(b'a' as u32, &bytes).unwrap(), "a");
        assert_eq!(d.push(0xE6, &bytes).unwrap(), "");
        assert_eq!(d.finish(&bytes).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn stream_decoder_stays_linear_on_text_that_never_completes_a_character() {
        // 0xFF is never valid UTF-8: every window ends in U+FFFD. Count the bytes decoded.
        let decoded = std::cell::Cell::new(0usize);
        let counting = |ids: &[u32]| {
            decoded.set(decoded.get() + ids.len());
            bytes(ids)
        };
        let mut d = StreamDecoder::new();
        let n = 20_000;
        let mut out = String::new();
        for _ in 0..n {
            out.push_str(&d.push(0xFF, &counting).unwrap());
        }
        out.push_str(&d.finish(&counting).unwrap());
        assert_eq!(out.chars().filter(|&c| c == '\u{FFFD}').count(), n);
        assert!(
            decoded.get() < 4 * MAX_PENDING_IDS * n,
            "{} ids decoded",
            decoded.get()
        );
    }

    /// A SentencePiece-like decoder: "▁" is a space, and a leading space of the text is dropped.
    fn spm(ids: &[u32]) -> Result<String> {
        let vocab = ["▁Hello", "▁world", "!", "▁again"];
        let s: String = ids.iter().map(|&i| vocab[i as usize]).collect();
        let s = s.replace('▁', " ");
        Ok(s.strip_prefix(' ').unwrap_or(&s).to_string())
    }

    #[test]
    fn stream_decoder_keeps_spaces_of_sentencepiece_pieces() {
        let mut d = StreamDecoder::new();
        let out: String = [0, 1, 2, 3]
            .iter()
            .map(|&i| d.push(i, &spm).unwrap())
            .collect();
        assert_eq!(out, "Hello world! again");
    }
}
