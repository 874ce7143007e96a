//! Expected against actual: a scenario's `then` is a subset of what was written, compared key by
//! key, with placeholders for what the host or the guest generates (ids, hashes, times). Every
//! difference is a [`Difference`] naming the field by its path.

use serde::Serialize;
use serde_json::Value;

/// One way the actual outcome differs from the expected one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    /// Where: `then[0] UserRegistered → user.u1: data.username`.
    pub at: String,
    pub expected: String,
    pub actual: String,
}

impl Difference {
    pub fn new(
        at: impl Into<String>,
        expected: impl Into<String>,
        actual: impl Into<String>,
    ) -> Self {
        Self {
            at: at.into(),
            expected: expected.into(),
            actual: actual.into(),
        }
    }
}

/// Compares `actual` against `expected` as a subset: every key of an expected object must be in
/// the actual one with a matching value; arrays match element by element; the placeholders
/// `"<any>"`, `"<string>"`, `"<number>"` and `"<uuid>"` match by shape.
pub fn subset(at: &str, expected: &Value, actual: Option<&Value>, out: &mut Vec<Difference>) {
    let shown =
        |value: Option<&Value>| value.map_or_else(|| "(missing)".to_owned(), Value::to_string);
    if let Value::String(text) = expected
        && let Some(matches) = placeholder(text, actual)
    {
        if !matches {
            out.push(Difference::new(at, text.clone(), shown(actual)));
        }
        return;
    }
    match (expected, actual) {
        (Value::Object(expected), Some(Value::Object(actual))) => {
            for (key, value) in expected {
                subset(&join(at, key), value, actual.get(key), out);
            }
        }
        (Value::Array(expected), Some(Value::Array(actual))) if expected.len() == actual.len() => {
            for (index, (e, a)) in expected.iter().zip(actual).enumerate() {
                subset(&format!("{at}[{index}]"), e, Some(a), out);
            }
        }
        (expected, Some(actual)) if same(expected, actual) => {}
        (expected, actual) => out.push(Difference::new(at, expected.to_string(), shown(actual))),
    }
}

fn join(at: &str, key: &str) -> String {
    if at.ends_with(':') || at.is_empty() {
        format!("{at} {key}").trim_start().to_owned()
    } else {
        format!("{at}.{key}")
    }
}

/// Numbers compare by value (TOML's `1` and JSON's `1.0` are the same count).
fn same(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::Number(e), Value::Number(a)) => e.as_f64() == a.as_f64(),
        _ => expected == actual,
    }
}

/// `Some(matched)` when `text` is a placeholder.
fn placeholder(text: &str, actual: Option<&Value>) -> Option<bool> {
    Some(match text {
        "<any>" => actual.is_some(),
        "<string>" => actual.is_some_and(Value::is_string),
        "<number>" => actual.is_some_and(Value::is_number),
        "<uuid>" => actual.and_then(Value::as_str).is_some_and(is_uuid),
        _ => return None,
    })
}

fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn differences(expected: Value, actual: Value) -> Vec<Difference> {
        let mut out = Vec::new();
        subset("data:", &expected, Some(&actual), &mut out);
        out
    }

    #[test]
    fn an_expected_subset_matches_a_larger_actual_value() {
        let actual = json!({"username": "ann", "extra": [1, 2], "nested": {"a": 1, "b": 2}});
        assert!(differences(json!({"username": "ann", "nested": {"a": 1}}), actual).is_empty());
    }

    #[test]
    fn a_difference_names_the_field_by_its_path() {
        let found = differences(
            json!({"user": {"name": "ann"}, "tags": ["a"]}),
            json!({"user": {"name": "bob"}, "tags": ["b"]}),
        );
        assert_eq!(
            found,
            vec![
                Difference::new("data: tags[0]", "\"a\"", "\"b\""),
                Difference::new("data: user.name", "\"ann\"", "\"bob\""),
            ]
        );
        let missing = differences(json!({"gone": 1}), json!({}));
        assert_eq!(
            missing,
            vec![Difference::new("data: gone", "1", "(missing)")]
        );
    }

    #[test]
    fn placeholders_match_by_shape() {
        let actual = json!({
            "id": "0b6f1c2e-8a4d-4c1e-9f00-123456789abc", "n": 3, "s": "x", "any": null
        });
        let shapes = json!({"id": "<uuid>", "n": "<number>", "s": "<string>", "any": "<any>"});
        assert!(differences(shapes, actual.clone()).is_empty());
        let wrong = json!({"id": "<number>", "n": "<string>", "s": "<uuid>", "gone": "<any>"});
        assert_eq!(differences(wrong, actual).len(), 4);
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(differences(json!({"n": 1}), json!({"n": 1.0})).is_empty());
    }
}
