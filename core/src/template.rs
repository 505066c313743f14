//! Austin-style templates: string fields holding `{$name}` placeholders, filled from a request's
//! variables. Rendering is plain substitution: no expressions, no code, output size bounded.

use serde_json::{Map, Value};
use std::collections::BTreeSet;

/// Largest rendered content, in bytes of JSON text.
pub const MAX_RENDERED_BYTES: usize = 256 * 1024;

/// Why a template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("missing variables: {}", .0.join(", "))]
    MissingVariables(Vec<String>),
    #[error("rendered content is larger than {limit} bytes")]
    TooLarge { limit: usize },
}

/// Every placeholder name used anywhere in `content`, sorted.
pub fn placeholders(content: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    visit_strings(content, &mut |s| {
        for_each_placeholder(s, |name| {
            out.insert(name.to_string());
        })
    });
    out
}

/// `content` with every `{$name}` replaced by the variable's value (strings as they are, other
/// JSON values as their JSON text). Names absent from `vars` are all reported at once; content
/// over [`MAX_RENDERED_BYTES`] is refused.
pub fn render(content: &Value, vars: &Map<String, Value>) -> Result<Value, RenderError> {
    render_within(content, vars, MAX_RENDERED_BYTES)
}

/// [`render`] with another size limit (the fuzz targets use a small one, which inputs of a
/// fuzzer's usual sizes can reach).
pub fn render_within(
    content: &Value,
    vars: &Map<String, Value>,
    limit: usize,
) -> Result<Value, RenderError> {
    let missing: Vec<String> = placeholders(content)
        .into_iter()
        .filter(|n| !vars.contains_key(n))
        .collect();
    if !missing.is_empty() {
        return Err(RenderError::MissingVariables(missing));
    }
    let too_large = || RenderError::TooLarge { limit };
    // The budget counts the bytes of rendered strings, a lower bound of the JSON text that
    // stops a hostile template early; the JSON text (escapes, keys, other values) is checked
    // once rendering is done.
    let mut budget = limit;
    let out = render_value(content, vars, &mut budget).map_err(|OverBudget| too_large())?;
    if json_len(&out) > limit {
        return Err(too_large());
    }
    Ok(out)
}

/// The length of `v` as JSON text, counted without building the text.
pub fn json_len(v: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    match serde_json::to_writer(&mut counter, v) {
        Ok(()) => counter.0,
        Err(_) => usize::MAX,
    }
}

/// The rendered content would be over its size limit.
struct OverBudget;

fn render_value(
    v: &Value,
    vars: &Map<String, Value>,
    budget: &mut usize,
) -> Result<Value, OverBudget> {
    Ok(match v {
        Value::String(s) => {
            let out = render_str(s, vars, *budget)?;
            *budget -= out.len();
            Value::String(out)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| render_value(i, vars, budget))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => {
            let mut out = Map::with_capacity(map.len());
            for (k, i) in map {
                out.insert(k.clone(), render_value(i, vars, budget)?);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

/// `s` rendered, or `OverBudget` as soon as it is longer than `budget` bytes: a template
/// repeating a large variable must not build its whole output first.
fn render_str(s: &str, vars: &Map<String, Value>, budget: usize) -> Result<String, OverBudget> {
    let mut out = String::with_capacity(s.len().min(budget));
    let push = |out: &mut String, piece: &str| {
        if out.len() + piece.len() > budget {
            return Err(OverBudget);
        }
        out.push_str(piece);
        Ok(())
    };
    let mut rest = s;
    while let Some((start, name, end)) = next_placeholder(rest) {
        push(&mut out, &rest[..start])?;
        match vars.get(name) {
            Some(Value::String(v)) => push(&mut out, v)?,
            Some(other) => push(&mut out, &other.to_string())?,
            None => push(&mut out, &rest[start..end])?,
        }
        rest = &rest[end..];
    }
    push(&mut out, rest)?;
    Ok(out)
}

/// Finds the next `{$name}` in `s`: (start, name, end) byte positions.
fn next_placeholder(s: &str) -> Option<(usize, &str, usize)> {
    let mut from = 0;
    while let Some(i) = s[from..].find("{$") {
        let start = from + i;
        let name_start = start + 2;
        let name_len = s[name_start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-'))
            .unwrap_or(s.len() - name_start);
        let close = name_start + name_len;
        if name_len > 0 && s[close..].starts_with('}') {
            return Some((start, &s[name_start..close], close + 1));
        }
        from = name_start;
    }
    None
}

fn for_each_placeholder(s: &str, mut f: impl FnMut(&str)) {
    let mut rest = s;
    while let Some((_, name, end)) = next_placeholder(rest) {
        f(name);
        rest = &rest[end..];
    }
}

fn visit_strings(v: &Value, f: &mut impl FnMut(&str)) {
    match v {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter().for_each(|i| visit_strings(i, f)),
        Value::Object(map) => map.values().for_each(|i| visit_strings(i, f)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn renders_every_string_field() {
        let content =
            json!({"title": "Hi {$name}", "body": ["code {$code}", 3], "n": {"x": "{$name}!"}});
        let out = render(&content, &vars(json!({"name": "Ann", "code": 1234}))).unwrap();
        assert_eq!(
            out,
            json!({"title": "Hi Ann", "body": ["code 1234", 3], "n": {"x": "Ann!"}})
        );
    }

    #[test]
    fn reports_every_missing_variable() {
        let content = json!({"a": "{$x} {$y}", "b": "{$z}"});
        let err = render(&content, &vars(json!({"y": "1"}))).unwrap_err();
        assert_eq!(
            err,
            RenderError::MissingVariables(vec!["x".into(), "z".into()])
        );
    }

    #[test]
    fn malformed_placeholders_stay_literal() {
        let content = json!("{$} {$a b} {$open {x} $y {$ok}");
        assert_eq!(placeholders(&content), BTreeSet::from(["ok".to_string()]));
        let out = render(&content, &vars(json!({"ok": "v"}))).unwrap();
        assert_eq!(out, json!("{$} {$a b} {$open {x} $y v"));
    }

    #[test]
    fn values_are_not_re_expanded() {
        let out = render(&json!("{$a}"), &vars(json!({"a": "{$a}{$a}"}))).unwrap();
        assert_eq!(out, json!("{$a}{$a}"));
    }

    #[test]
    fn the_limit_counts_json_text() {
        // 100 KiB of control characters are 600 KiB of JSON text (`\u0001` each).
        let content = json!({"body": "{$v}"});
        let out = render(&content, &vars(json!({"v": "\u{1}".repeat(100 * 1024)})));
        assert_eq!(
            out,
            Err(RenderError::TooLarge {
                limit: MAX_RENDERED_BYTES
            })
        );
        // What is not a string counts too.
        let numbers = json!(vec![1_000_000; 40_000]);
        assert!(render(&numbers, &Map::new()).is_err());
    }

    #[test]
    fn a_repeated_large_variable_stops_at_the_limit() {
        // Each within its limit (64 KiB), 16 Ki placeholders and one 64 KiB variable would render
        // 1 GiB; rendering stops once it is past the limit.
        let content = json!("{$v}".repeat(16 * 1024));
        let v = vars(json!({"v": "x".repeat(64 * 1024)}));
        let start = std::time::Instant::now();
        assert_eq!(
            render(&content, &v),
            Err(RenderError::TooLarge {
                limit: MAX_RENDERED_BYTES
            })
        );
        let took = start.elapsed();
        assert!(took < std::time::Duration::from_millis(100), "{took:?}");
    }

    #[test]
    fn output_size_is_bounded() {
        let big = "x".repeat(100_000);
        let content = json!(["{$v}", "{$v}", "{$v}"]);
        assert_eq!(
            render(&content, &vars(json!({"v": big}))),
            Err(RenderError::TooLarge {
                limit: MAX_RENDERED_BYTES
            })
        );
    }
}
