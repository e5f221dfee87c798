//! Typed reads of the JSON settings files (config.json with its `rope_scaling` and window keys,
//! generation_config.json, and the config lockstep rebuilds from GGUF metadata): one getter per
//! kind of value, one error type, the same one-line messages everywhere.

use serde_json::{Map, Value};

/// What is wrong with a settings file. Each renders as one line; the caller adds the file's path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not JSON.
    #[error("not valid JSON: {0}")]
    Json(String),
    /// The JSON is not an object.
    #[error("expected a JSON object")]
    NotObject,
    /// A required key is absent (or null).
    #[error("missing required key '{0}'")]
    Missing(String),
    /// A key holds a value of the wrong kind or out of its range.
    #[error("'{key}' must be {want}, got {got}")]
    Value {
        /// The key, with its parent's name where it is nested (`rope_scaling.factor`).
        key: String,
        /// What it must be ("a positive integer", "true or false", ...).
        want: &'static str,
        /// The value found, as JSON.
        got: String,
    },
    /// A token id that is not an integer in `0..=u32::MAX` (never truncated).
    #[error("'{key}' holds {got}, which is not a token id (an integer in 0..=4294967295)")]
    TokenId {
        /// The key.
        key: String,
        /// The value found, as JSON.
        got: String,
    },
    /// The values are each well-formed but together invalid or unsupported (the message says
    /// which and why).
    #[error("{0}")]
    Invalid(String),
}

impl From<String> for ConfigError {
    fn from(msg: String) -> Self {
        ConfigError::Invalid(one_line(&msg))
    }
}

impl From<&str> for ConfigError {
    fn from(msg: &str) -> Self {
        ConfigError::Invalid(one_line(msg))
    }
}

/// `msg` with control characters escaped (`\n`, `\u{1b}`, ...): messages quote values from
/// the file, and an error is one line whatever the file holds (found by fuzzing: a `model_type`
/// holding newlines gave a multi-line error).
pub fn one_line(msg: &str) -> String {
    if !msg.chars().any(char::is_control) {
        return msg.to_string();
    }
    msg.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Parses `text` as JSON (the error is [`ConfigError::Json`]).
pub fn parse(text: &str) -> Result<Value, ConfigError> {
    serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))
}

/// The keys of one JSON object, read with their kind checked. A key that is null counts as absent,
/// as in transformers' configs.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    obj: &'a Map<String, Value>,
    /// Prefix for keys in messages (`"rope_scaling."`), empty at the top level.
    parent: &'a str,
}

impl<'a> Fields<'a> {
    /// The fields of `v`, which must be an object.
    pub fn of(v: &'a Value) -> Result<Self, ConfigError> {
        let obj = v.as_object().ok_or(ConfigError::NotObject)?;
        Ok(Fields { obj, parent: "" })
    }

    /// The fields of a nested object, named `parent` in messages (e.g. `rope_scaling`).
    pub fn nested(obj: &'a Map<String, Value>, parent: &'a str) -> Self {
        Fields { obj, parent }
    }

    /// The whole object.
    pub fn map(&self) -> &'a Map<String, Value> {
        self.obj
    }

    /// The value of `k`, `None` when absent or null.
    pub fn get(&self, k: &str) -> Option<&'a Value> {
        self.obj.get(k).filter(|v| !v.is_null())
    }

    fn wrong(&self, k: &str, want: &'static str, got: &Value) -> ConfigError {
        ConfigError::Value {
            key: format!("{}{k}", self.dotted()),
            want,
            got: got.to_string(),
        }
    }

    fn dotted(&self) -> String {
        if self.parent.is_empty() {
            String::new()
        } else {
            format!("{}.", self.parent)
        }
    }

    /// A required positive integer.
    pub fn positive(&self, k: &str) -> Result<usize, ConfigError> {
        let x = self
            .get(k)
            .ok_or_else(|| ConfigError::Missing(format!("{}{k}", self.dotted())))?;
        x.as_u64()
            .filter(|&n| n > 0)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.wrong(k, "a positive integer", x))
    }

    /// An optional non-negative integer.
    pub fn count(&self, k: &str) -> Result<Option<usize>, ConfigError> {
        self.get(k)
            .map(|x| {
                x.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.wrong(k, "a non-negative integer", x))
            })
            .transpose()
    }

    /// An optional number.
    pub fn number(&self, k: &str) -> Result<Option<f64>, ConfigError> {
        self.get(k)
            .map(|x| x.as_f64().ok_or_else(|| self.wrong(k, "a number", x)))
            .transpose()
    }

    /// An optional boolean.
    pub fn flag(&self, k: &str) -> Result<Option<bool>, ConfigError> {
        self.get(k)
            .map(|x| x.as_bool().ok_or_else(|| self.wrong(k, "true or false", x)))
            .transpose()
    }

    /// A boolean, `default` when absent.
    pub fn flag_or(&self, k: &str, default: bool) -> Result<bool, ConfigError> {
        Ok(self.flag(k)?.unwrap_or(default))
    }

    /// Token ids: one integer, a list of them (nulls skipped), or nothing.
    pub fn token_ids(&self, k: &str) -> Result<Vec<u32>, ConfigError> {
        let one = |x: &Value| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| ConfigError::TokenId {
                    key: format!("{}{k}", self.dotted()),
                    got: x.to_string(),
                })
        };
        match self.get(k) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a.iter().filter(|x| !x.is_null()).map(one).collect(),
            Some(x) => Ok(vec![one(x)?]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getters_check_kinds_and_name_the_key() {
        let v = parse(
            r#"{"a": 3, "b": -1, "c": "x", "d": null, "e": [1, null, 4294967298], "f": true}"#,
        )
        .unwrap();
        let f = Fields::of(&v).unwrap();
        assert_eq!(f.positive("a"), Ok(3));
        assert_eq!(
            f.positive("b").unwrap_err().to_string(),
            "'b' must be a positive integer, got -1"
        );
        assert_eq!(
            f.positive("d").unwrap_err(),
            ConfigError::Missing("d".into())
        );
        assert_eq!(
            f.number("c").unwrap_err().to_string(),
            "'c' must be a number, got \"x\""
        );
        assert_eq!(f.count("d"), Ok(None));
        assert_eq!(f.flag_or("f", false), Ok(true));
        assert_eq!(f.flag_or("d", true), Ok(true));
        assert_eq!(
            f.token_ids("e").unwrap_err().to_string(),
            "'e' holds 4294967298, which is not a token id (an integer in 0..=4294967295)"
        );
        assert_eq!(f.token_ids("a"), Ok(vec![3]));
        let nested = Fields::nested(v.as_object().unwrap(), "rope_scaling");
        assert_eq!(
            nested.number("c").unwrap_err().to_string(),
            "'rope_scaling.c' must be a number, got \"x\""
        );
        assert_eq!(
            parse("[1]").map(|v| Fields::of(&v).map(|_| ())).unwrap(),
            Err(ConfigError::NotObject)
        );
        assert!(matches!(parse("{"), Err(ConfigError::Json(_))));
        assert_eq!(
            ConfigError::from("model_type 'a\nb\r\u{1b}'").to_string(),
            "model_type 'a\\nb\\r\\u{1b}'"
        );
    }
}
