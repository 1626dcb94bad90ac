//! Python's `json.dumps(x, ensure_ascii=False)` byte for byte (separators `", "` and `": "`), and the
//! `indent=N` form, because LLaMA-Factory's tool prompts and function calls embed that text.

use std::io;

use serde::Serialize;
use serde_json::Value;
use serde_json::ser::{Formatter, PrettyFormatter, Serializer};

/// Python's default separators: `", "` between items, `": "` after keys.
struct PyFormatter;

/// `", "` before every item but the first.
fn comma<W: ?Sized + io::Write>(writer: &mut W, first: bool) -> io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

impl Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        comma(writer, first)
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        comma(writer, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }
}

fn finish(buf: Vec<u8>) -> String {
    String::from_utf8(buf).unwrap_or_default()
}

/// `json.dumps(value, ensure_ascii=False)`.
pub fn dumps(value: &Value) -> String {
    let mut buf = Vec::new();
    let mut ser = Serializer::with_formatter(&mut buf, PyFormatter);
    // Serialising a `Value` into a Vec cannot fail.
    let _ = value.serialize(&mut ser);
    finish(buf)
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)` (items end with `,` + newline, keys `": "`).
pub fn dumps_indent(value: &Value, indent: usize) -> String {
    let spaces = vec![b' '; indent];
    let mut buf = Vec::new();
    let mut ser = Serializer::with_formatter(&mut buf, PrettyFormatter::with_indent(&spaces));
    let _ = value.serialize(&mut ser);
    finish(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_python_default_separators() {
        // python3 -c 'import json; print(json.dumps({"a": [1, "é", {"b": None}], "c": True}, ensure_ascii=False))'
        let v = serde_json::json!({"a": [1, "é", {"b": null}], "c": true});
        assert_eq!(dumps(&v), r#"{"a": [1, "é", {"b": null}], "c": true}"#);
    }

    #[test]
    fn matches_python_indent() {
        // python3 -c 'import json; print(json.dumps({"a": [1, 2], "b": {}}, indent=4))'
        let v = serde_json::json!({"a": [1, 2], "b": {}});
        assert_eq!(
            dumps_indent(&v, 4),
            "{\n    \"a\": [\n        1,\n        2\n    ],\n    \"b\": {}\n}"
        );
    }
}
