//! Chat templates: the checkpoint's Jinja template rendered with `minijinja` the way
//! `transformers.apply_chat_template` renders it (trim_blocks, lstrip_blocks, `raise_exception`,
//! Python-`json.dumps`-style `tojson`, `add_generation_prompt`, special tokens in the context).

use crate::error::{EngineError, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// One chat message (`role` and `content`, plus any extra fields such as `tool_calls`).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
    /// Extra fields passed to the template as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl Message {
    /// A message with just a role and content.
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            extra: Default::default(),
        }
    }
}

/// A loaded chat template with the special tokens of its tokenizer config.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    special: serde_json::Map<String, Value>,
}

fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// The template of a model folder: `chat_template.jinja`, else `tokenizer_config.json`'s
    /// `chat_template` (a string, or a list of named templates: "default"). `Ok(None)` when the
    /// model has none.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        Self::from_source(&crate::source::ModelSource::resolve(dir)?)
    }

    /// [`Self::from_dir`] for a resolved source.
    pub fn from_source(source: &crate::source::ModelSource) -> Result<Option<Self>> {
        // A GGUF: a tokenizer_config.json beside it, else the template in its metadata.
        let gguf = source.gguf().map(Path::to_path_buf);
        let folder = source.side_folder().to_path_buf();
        let cfg_path = folder.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| {
                EngineError::Tokenizer(format!("{}: not valid JSON: {e}", cfg_path.display()))
            })?,
            Err(_) => match &gguf {
                Some(file) => crate::gguf::tokenizer_config(&crate::gguf::read(file)?.1),
                None => Value::Null,
            },
        };
        let dir = folder.as_path();
        let mut special = serde_json::Map::new();
        for k in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let Some(t) = cfg.get(k).and_then(token_text) {
                special.insert(k.into(), Value::String(t));
            }
        }
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            std::fs::read_to_string(&jinja).map_err(|source| EngineError::Io {
                path: jinja.clone(),
                source,
            })?
        } else {
            match cfg.get("chat_template") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(str::to_string)
                    .ok_or_else(|| {
                        EngineError::Tokenizer("chat_template list has no \"default\" entry".into())
                    })?,
                _ => return Ok(None),
            }
        };
        Ok(Some(ChatTemplate { source, special }))
    }

    /// A template from source text, with the given special tokens.
    pub fn new(source: &str, special: serde_json::Map<String, Value>) -> Self {
        ChatTemplate {
            source: source.into(),
            special,
        }
    }

    /// Renders a conversation. `tools` is the list of tool definitions, if any.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&Value>,
    ) -> Result<String> {
        self.render_with_vars(messages, add_generation_prompt, tools, &Default::default())
    }

    /// [`Self::render`] with extra template variables, as transformers'
    /// `apply_chat_template(..., **kwargs)` passes them (Qwen3's `enable_thinking: false`).
    pub fn render_with_vars(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&Value>,
        vars: &serde_json::Map<String, Value>,
    ) -> Result<String> {
        let err = |e: minijinja::Error| EngineError::Tokenizer(format!("chat template: {e}"));
        let mut env = minijinja::Environment::new();
        // A template is code from whoever published the model: bound its work, its nesting and
        // its output so that none can hang, overflow the stack or fill memory.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_RECURSION_LIMIT);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_filter("tojson", tojson);
        env.set_unknown_method_callback(crate::chat_py::string_method);
        env.add_template("chat", &self.source).map_err(err)?;
        let mut ctx = self.special.clone();
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages).expect("messages serialize"),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        if let Some(t) = tools {
            ctx.insert("tools".into(), t.clone());
        }
        for (k, v) in vars {
            ctx.insert(k.clone(), v.clone());
        }
        let mut out = CappedOutput::default();
        env.get_template("chat")
            .and_then(|t| t.render_captured_to(Value::Object(ctx), &mut out))
            .map_err(|e| {
                if out.over {
                    EngineError::Tokenizer(format!(
                        "chat template: its output exceeds {} MiB (refused)",
                        TEMPLATE_OUTPUT_LIMIT >> 20
                    ))
                } else if e.kind() == minijinja::ErrorKind::OutOfFuel {
                    EngineError::Tokenizer(format!(
                        "chat template: rendering took more than {TEMPLATE_FUEL} steps (a runaway loop?); refused"
                    ))
                } else {
                    err(e)
                }
            })?;
        String::from_utf8(out.buf)
            .map_err(|_| EngineError::Tokenizer("chat template: output is not UTF-8".into()))
    }
}

/// Instructions a chat template may execute in one rendering (about 2 s; real templates with
/// tools and a long conversation use well under a million).
pub const TEMPLATE_FUEL: u64 = 10_000_000;

/// Nesting depth (calls, includes, nested expressions) a chat template may reach.
pub const TEMPLATE_RECURSION_LIMIT: usize = 200;

/// Bytes a rendered chat template may produce (a prompt far beyond any model's context).
pub const TEMPLATE_OUTPUT_LIMIT: usize = 64 << 20;

/// A writer that refuses to grow past [`TEMPLATE_OUTPUT_LIMIT`].
#[derive(Default)]
struct CappedOutput {
    buf: Vec<u8>,
    over: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(buf.len()) > TEMPLATE_OUTPUT_LIMIT {
            self.over = true;
            return Err(std::io::Error::other("chat template output limit"));
        }
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`
/// (separators `", "` and `": "`, keys in insertion order, no HTML escaping).
fn tojson(
    v: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&v).map_err(|e| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    })?;
    let mut out = String::new();
    py_json(&json, indent, 0, &mut out);
    Ok(minijinja::Value::from_safe_string(out))
}

/// Writes `v` the way Python's `json.dumps(v, ensure_ascii=False, indent=indent)` does.
pub fn py_json(v: &Value, indent: Option<usize>, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                py_json(x, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(k).expect("string"));
                out.push_str(": ");
                py_json(x, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).expect("json")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_style_json() {
        let v: Value = serde_json::from_str(r#"{"b": 1, "a": [1, 2.5, "x<y"], "c": {}}"#).unwrap();
        let mut s = String::new();
        py_json(&v, None, 0, &mut s);
        assert_eq!(s, r#"{"b": 1, "a": [1, 2.5, "x<y"], "c": {}}"#);
        let mut s = String::new();
        py_json(&serde_json::json!({"a": [1]}), Some(2), 0, &mut s);
        assert_eq!(s, "{\n  \"a\": [\n    1\n  ]\n}");
    }

    #[test]
    fn renders_with_trim_and_generation_prompt() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n<{{ m.role }}>{{ m.content }}\n{% endfor %}\n{% if add_generation_prompt %}<assistant>{% endif %}",
            Default::default(),
        );
        let s = t.render(&[Message::new("user", "hi")], true, None).unwrap();
        assert_eq!(s, "<user>hi\n<assistant>");
        let bad = ChatTemplate::new("{{ raise_exception('no system') }}", Default::default());
        assert!(bad
            .render(&[], false, None)
            .unwrap_err()
            .to_string()
            .contains("no system"));
    }

    fn refusal(src: &str) -> String {
        let t = ChatTemplate::new(src, serde_json::Map::new());
        let t0 = std::time::Instant::now();
        let e = t
            .render(&[Message::new("user", "hi")], true, None)
            .unwrap_err();
        assert!(
            t0.elapsed().as_secs() < 20,
            "{src}: took {:?}",
            t0.elapsed()
        );
        e.to_string()
    }

    #[test]
    fn hostile_templates_are_bounded() {
        let e = refusal(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        );
        assert!(e.contains("steps"), "{e}");
        let e = refusal("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}");
        assert!(e.contains("MiB") || e.contains("steps"), "{e}");
        let deep = format!("{{{{ {}1{} }}}}", "[".repeat(5000), "]".repeat(5000));
        let e = refusal(&deep);
        assert!(e.starts_with("tokenizer: chat template:"), "{e}");
        let e = refusal("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
        assert!(e.starts_with("tokenizer: chat template:"), "{e}");
    }
}
