//! The Python `str` methods chat templates call (`content.startswith('<tool_response>')`,
//! `content.split('</think>')[-1].lstrip('\n')`, as Qwen3's template does), which minijinja does
//! not have: `startswith`, `endswith`, `split`, `strip`, `lstrip`, `rstrip`, with Python's
//! semantics. Any other unknown method stays an error.

use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind, State};

fn bad(msg: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg)
}

/// The optional string argument `i` of `method` (`None` when absent or `none`).
fn opt_str<'a>(method: &str, args: &'a [Value], i: usize) -> Result<Option<&'a str>, Error> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| bad(format!("str.{method}: argument {} must be a string", i + 1))),
    }
}

/// Python's `str.strip` family: `chars` None strips whitespace.
fn strip<'a>(s: &'a str, chars: Option<&str>, left: bool, right: bool) -> &'a str {
    let drop = |c: char| chars.map_or(c.is_whitespace(), |set| set.contains(c));
    let s = if left { s.trim_start_matches(drop) } else { s };
    if right {
        s.trim_end_matches(drop)
    } else {
        s
    }
}

/// Python's `str.split(sep=None, maxsplit=-1)`.
fn split(s: &str, sep: Option<&str>, maxsplit: Option<usize>) -> Result<Vec<String>, Error> {
    let max = maxsplit.unwrap_or(usize::MAX);
    Ok(match sep {
        Some("") => return Err(bad("str.split: empty separator".into())),
        Some(sep) => match maxsplit {
            None => s.split(sep).map(str::to_string).collect(),
            Some(_) => s
                .splitn(max.saturating_add(1), sep)
                .map(str::to_string)
                .collect(),
        },
        None => {
            // Runs of whitespace separate; leading/trailing whitespace gives no empty strings.
            let mut out = vec![];
            let mut rest = s.trim_start();
            while !rest.is_empty() {
                if out.len() == max {
                    out.push(rest.to_string());
                    break;
                }
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                out.push(rest[..end].to_string());
                rest = rest[end..].trim_start();
            }
            out
        }
    })
}

/// `startswith` / `endswith`: the argument is a string or a sequence of strings (any matches).
fn affix(s: &str, method: &str, arg: Option<&Value>) -> Result<bool, Error> {
    let test = |a: &str| {
        if method == "startswith" {
            s.starts_with(a)
        } else {
            s.ends_with(a)
        }
    };
    let arg = arg.ok_or_else(|| bad(format!("str.{method} takes one argument")))?;
    if let Some(a) = arg.as_str() {
        return Ok(test(a));
    }
    if arg.kind() == ValueKind::Seq {
        for item in arg.try_iter()? {
            let a = item
                .as_str()
                .ok_or_else(|| bad(format!("str.{method}: tuple items must be strings")))?;
            if test(a) {
                return Ok(true);
            }
        }
        return Ok(false);
    }
    Err(bad(format!("str.{method}: argument must be a string")))
}

/// minijinja's unknown-method callback: the Python string methods above, else an error.
pub fn string_method(
    _state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    let Some(s) = value.as_str() else {
        return Err(Error::new(
            ErrorKind::UnknownMethod,
            format!("{} has no method named {method}", value.kind()),
        ));
    };
    match method {
        "startswith" | "endswith" => affix(s, method, args.first()).map(Value::from),
        "strip" => Ok(Value::from(strip(s, opt_str(method, args, 0)?, true, true))),
        "lstrip" => Ok(Value::from(strip(
            s,
            opt_str(method, args, 0)?,
            true,
            false,
        ))),
        "rstrip" => Ok(Value::from(strip(
            s,
            opt_str(method, args, 0)?,
            false,
            true,
        ))),
        "split" => {
            let maxsplit = match args.get(1) {
                None => None,
                Some(v) => match i64::try_from(v.clone()) {
                    Ok(n) if n < 0 => None,
                    Ok(n) => Some(n as usize),
                    Err(_) => return Err(bad("str.split: maxsplit must be an integer".into())),
                },
            };
            split(s, opt_str(method, args, 0)?, maxsplit).map(Value::from)
        }
        _ => Err(Error::new(
            ErrorKind::UnknownMethod,
            format!("string has no method named {method}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_string_semantics() {
        assert_eq!(strip("\n\nab\n", Some("\n"), true, false), "ab\n");
        assert_eq!(strip("  ab \t", None, true, true), "ab");
        assert_eq!(strip("xxabyx", Some("xy"), false, true), "xxab");
        assert_eq!(
            split("a</t>b</t>", Some("</t>"), None).unwrap(),
            ["a", "b", ""]
        );
        assert_eq!(split("  a  b ", None, None).unwrap(), ["a", "b"]);
        assert_eq!(split("a,b,c", Some(","), Some(1)).unwrap(), ["a", "b,c"]);
        assert!(split("a", Some(""), None).is_err());
    }

    #[test]
    fn renders_qwen3_style_expressions() {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(string_method);
        let t = "{{ c.split('</think>')[-1].lstrip('\\n') }}|{{ c.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') }}|{{ c.startswith('<think>') }}|{{ c.endswith(('x', 'done')) }}|{{ ' r '.strip() }}";
        let out = env
            .render_str(
                t,
                minijinja::context! {c => "<think>\nhm\n</think>\n\ndone"},
            )
            .unwrap();
        assert_eq!(out, "done|hm|True|True|r");
        let e = env.render_str("{{ 'a'.nope() }}", ()).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
