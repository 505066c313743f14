//! Sensitive words: an app's dictionary, matched against every string value of a message's
//! content in one Aho-Corasick pass per string (leftmost-longest, ASCII case-insensitive), to
//! list the words found or to mask them with `*`.

use aho_corasick::{AhoCorasick, MatchKind};
use serde_json::Value;
use std::collections::BTreeSet;
use std::iter;

/// Most words a dictionary may hold (an app's own and the shared file's together).
const MAX_WORDS: usize = 100_000;
/// Longest word, in characters.
const MAX_WORD_CHARS: usize = 64;

/// A dictionary of sensitive words, matched in one pass over each text (Aho-Corasick,
/// leftmost-longest, ASCII case-insensitive).
#[derive(Debug, Clone)]
pub struct Dictionary {
    automaton: AhoCorasick,
    /// The distinct trimmed words, sorted; a match's pattern id indexes them.
    words: Vec<String>,
}

impl Dictionary {
    /// Builds the dictionary. Words are trimmed; an empty list is allowed (matches nothing).
    /// Errors, naming the word, on an empty word, a word longer than 64 characters or one
    /// containing `*`; errors on more than 100,000 words. Duplicates are fine.
    pub fn new(words: &[String]) -> Result<Self, String> {
        if words.len() > MAX_WORDS {
            return Err(format!(
                "{} words, but at most {MAX_WORDS} are allowed",
                words.len()
            ));
        }
        let mut distinct = BTreeSet::new();
        for (i, raw) in words.iter().enumerate() {
            let word = raw.trim();
            if word.is_empty() {
                return Err(format!("word #{} ({raw:?}) is empty", i + 1));
            }
            if word.chars().count() > MAX_WORD_CHARS {
                return Err(format!(
                    "word {word:?} is longer than {MAX_WORD_CHARS} characters"
                ));
            }
            if word.contains('*') {
                return Err(format!("word {word:?} contains '*', the mask character"));
            }
            distinct.insert(word);
        }
        let words: Vec<String> = distinct.into_iter().map(str::to_owned).collect();
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .ascii_case_insensitive(true)
            .build(&words)
            .map_err(|e| format!("cannot build the dictionary: {e}"))?;
        Ok(Self { automaton, words })
    }

    /// The words of a dictionary file: one per line, UTF-8; blank lines and lines starting
    /// with `#` are skipped.
    pub fn words_of_file(text: &str) -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    }

    /// Whether the dictionary has no words.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The distinct dictionary words (trimmed, as given) found in any string value of
    /// `content`, recursively through arrays and objects (keys are not content), sorted.
    pub fn matches(&self, content: &Value) -> Vec<String> {
        let mut found = BTreeSet::new();
        for_each_str(content, &mut |text| {
            found.extend(
                self.automaton
                    .find_iter(text)
                    .map(|m| m.pattern().as_usize()),
            );
        });
        // Ids index the sorted words, so sorted ids give sorted words.
        found.into_iter().map(|id| self.words[id].clone()).collect()
    }

    /// Replaces each match in every string value of `content` with one `*` per character
    /// (`"赌博"` becomes `"**"`); returns the number of matches replaced.
    pub fn mask(&self, content: &mut Value) -> usize {
        let mut count = 0;
        for_each_string_mut(content, &mut |text| count += self.mask_text(text));
        count
    }

    /// Masks the matches in one text; returns how many there were.
    fn mask_text(&self, text: &mut String) -> usize {
        let mut count = 0;
        let mut masked = String::with_capacity(text.len());
        self.automaton
            .replace_all_with(text, &mut masked, |_, found, dst| {
                count += 1;
                dst.extend(iter::repeat_n('*', found.chars().count()));
                true
            });
        if count > 0 {
            *text = masked;
        }
        count
    }
}

/// Calls `f` on every string value in `value`, through arrays and object values.
fn for_each_str(value: &Value, f: &mut impl FnMut(&str)) {
    match value {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter().for_each(|v| for_each_str(v, f)),
        Value::Object(map) => map.values().for_each(|v| for_each_str(v, f)),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Calls `f` on every string value in `value`, through arrays and object values, for change.
fn for_each_string_mut(value: &mut Value, f: &mut impl FnMut(&mut String)) {
    match value {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter_mut().for_each(|v| for_each_string_mut(v, f)),
        Value::Object(map) => map.values_mut().for_each(|v| for_each_string_mut(v, f)),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn dictionary(words: &[&str]) -> Dictionary {
        Dictionary::new(&words.iter().map(|w| w.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn chinese_and_ascii_words_are_found_and_masked() {
        let d = dictionary(&["赌博", "casino"]);
        let mut content = json!({"title": "Casino 赌博之夜", "body": "CASINO casino", "x": "ok"});
        assert_eq!(d.matches(&content), ["casino", "赌博"]);
        assert_eq!(d.mask(&mut content), 4);
        assert_eq!(
            content,
            json!({"title": "****** **之夜", "body": "****** ******", "x": "ok"})
        );
        assert!(d.matches(&content).is_empty());
    }

    #[test]
    fn the_longest_leftmost_word_wins() {
        let d = dictionary(&["赌", "赌博"]);
        let mut content = json!("赌博网站");
        assert_eq!(d.matches(&content), ["赌博"]);
        assert_eq!(d.mask(&mut content), 1);
        assert_eq!(content, json!("**网站"));
    }

    #[test]
    fn nested_strings_are_content_but_keys_numbers_and_bools_are_not() {
        let d = dictionary(&[" 赌博 ", "赌博", "42", "true"]);
        let mut content = json!({
            "赌博": [{"deep": "x赌博y"}, "赌博", 42, true, null],
            "n": {"42": "true"}
        });
        assert_eq!(d.matches(&content), ["true", "赌博"]);
        assert_eq!(d.mask(&mut content), 3);
        assert_eq!(
            content,
            json!({"赌博": [{"deep": "x**y"}, "**", 42, true, null], "n": {"42": "****"}})
        );
    }

    #[test]
    fn an_empty_dictionary_matches_nothing() {
        let d = Dictionary::new(&[]).unwrap();
        assert!(d.is_empty());
        assert!(!dictionary(&["a"]).is_empty());
        let mut content = json!({"a": "anything 赌博"});
        assert!(d.matches(&content).is_empty());
        assert_eq!(d.mask(&mut content), 0);
        assert_eq!(content, json!({"a": "anything 赌博"}));
    }

    #[test]
    fn bad_words_are_errors() {
        let long = "长".repeat(MAX_WORD_CHARS + 1);
        for (word, named) in [
            ("", "#1"),
            ("  ", "#1"),
            ("a*b", "a*b"),
            (long.as_str(), long.as_str()),
        ] {
            let e = Dictionary::new(&[word.to_string()]).unwrap_err();
            assert!(e.contains(named), "{e}");
        }
        assert!(Dictionary::new(&["长".repeat(MAX_WORD_CHARS)]).is_ok());
        assert!(Dictionary::new(&vec!["w".to_string(); MAX_WORDS]).is_ok());
        assert!(Dictionary::new(&vec!["w".to_string(); MAX_WORDS + 1]).is_err());
    }

    /// Text over a small alphabet, so that words and texts often meet.
    fn text(chars: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = String> {
        let alphabet = "abcxyzABCXYZ赌博".chars().collect::<Vec<_>>();
        proptest::collection::vec(proptest::sample::select(alphabet), chars)
            .prop_map(String::from_iter)
    }

    proptest! {
        #[test]
        fn masking_leaves_no_word_and_keeps_every_other_char(
            words in proptest::collection::vec(text(1..=4), 1..=5),
            original in text(0..=40),
        ) {
            let d = Dictionary::new(&words).unwrap();
            let mut content = Value::String(original.clone());
            let found = d.matches(&content);
            let count = d.mask(&mut content);
            prop_assert_eq!(found.is_empty(), count == 0);
            let masked = content.as_str().unwrap();
            prop_assert_eq!(masked.chars().count(), original.chars().count());
            prop_assert!(masked.chars().zip(original.chars()).all(|(m, o)| m == o || m == '*'));
            let lower = masked.to_ascii_lowercase();
            for word in &words {
                prop_assert!(!lower.contains(&word.to_ascii_lowercase()), "{word} in {masked}");
            }
        }
    }
}
