//! The check behind the `template` fuzz target (`fuzz/`) and the replay of its inputs
//! (`fuzz/seeds/template/`, `fuzz/corpus/template/`, replayed by `herald-ingest`'s `fuzzing`
//! tests): raw bytes in, herald's renderer run on them, a panic when a promise of the renderer
//! does not hold.

use crate::template::{RenderError, placeholders, render, render_within};
use serde_json::Value;

/// The size limit the check renders with instead of [`crate::template::MAX_RENDERED_BYTES`],
/// small enough for inputs of a fuzzer's usual sizes (4 KiB) to reach it.
pub const RENDER_LIMIT: usize = 1024;

/// Renders a template built from `data` and checks the result; answers the rendered content's
/// size in bytes of JSON text, or why it was refused.
///
/// `data` is the template's content, then a NUL byte and the variables. The content is JSON
/// when it parses, else one string. The variables are a JSON object when they parse as one,
/// else their text is the value of every placeholder of the content (the shape of a hostile
/// request: one large variable used many times).
///
/// Panics when a placeholder name is not one the syntax allows, when missing variables are not
/// reported exactly, when rendered content is larger than the limit (as JSON text), or when the
/// limit changes what is rendered rather than only refusing.
pub fn template(data: &[u8]) -> Result<usize, RenderError> {
    let (head, tail) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let content = serde_json::from_slice(head)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(head).into_owned()));
    let names = placeholders(&content);
    for name in &names {
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')),
            "placeholder name {name:?} is outside the syntax"
        );
    }
    let vars = match serde_json::from_slice(tail) {
        Ok(Value::Object(vars)) => vars,
        _ => {
            let text = Value::String(String::from_utf8_lossy(tail).into_owned());
            names.iter().map(|n| (n.clone(), text.clone())).collect()
        }
    };
    match render_within(&content, &vars, RENDER_LIMIT) {
        Ok(out) => {
            let size = json_size(&out);
            assert!(
                size <= RENDER_LIMIT,
                "rendered content is {size} bytes of JSON, over the {RENDER_LIMIT} limit"
            );
            assert_eq!(
                render(&content, &vars),
                Ok(out),
                "the limit changed what was rendered"
            );
            Ok(size)
        }
        Err(e) => {
            if let RenderError::MissingVariables(missing) = &e {
                let expected: Vec<&String> =
                    names.iter().filter(|n| !vars.contains_key(*n)).collect();
                assert_eq!(missing.iter().collect::<Vec<_>>(), expected);
            }
            Err(e)
        }
    }
}

fn json_size(v: &Value) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX, |t| t.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_split_at_the_first_nul() {
        assert_eq!(template(b"\"Hi {$name}\"\0{\"name\": \"Ann\"}"), Ok(8));
        // Not JSON: the whole text is one string, every placeholder gets the variables' text.
        assert_eq!(template(b"{$a}{$b}\0xy"), Ok(6));
        assert_eq!(
            template(b"{\"a\": \"{$x}\"}\0{}"),
            Err(RenderError::MissingVariables(vec!["x".into()]))
        );
    }
}
