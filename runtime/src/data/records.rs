//! Records: JSONL and text files read line by line through a reader bounded to
//! [`MAX_RECORD_BYTES`], each record with its line number, and errors that name the file and
//! line (a line too long, not UTF-8, not a JSON object; a missing or mistyped field).

use crate::data::DataError;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// The longest record Kiln reads: one line of a JSONL or text file, 4 MiB. A training sequence
/// is at most a few thousand tokens (tens of KiB of text), and even a whole book chapter as one
/// masked-LM document is well under 1 MiB; a longer line is almost always a file that is not
/// line-delimited (a JSON array on one line, a binary file). Lines are read through a reader
/// bounded to this size, so such a file costs 4 MiB of memory and an error that names its line,
/// not gigabytes (parsing and tokenizing a 50 MB line took 8 GB).
pub const MAX_RECORD_BYTES: usize = 4 << 20;

/// A human size: "4 MiB", "256 MiB", "1536 bytes".
pub(super) fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes & ((1 << 20) - 1) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// Whether `path` is read as JSONL (by its extension) rather than as plain text lines.
pub(super) fn is_jsonl(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "jsonl")
}

/// Reads `path` line by line, calling `each` with the 1-based line number and the line without
/// its end (`\n` or `\r\n`, and a UTF-8 byte-order mark on the first line). Each line is read
/// through a reader bounded to [`MAX_RECORD_BYTES`]: a longer line is an error naming it, found
/// without reading the rest of it; a line that is not UTF-8 is an error naming it too.
pub(super) fn for_each_line(
    path: &Path,
    mut each: impl FnMut(usize, &str) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let file = std::fs::File::open(path)
        .map_err(|e| DataError(format!("{}: cannot open: {e}", path.display())))?;
    let mut reader = BufReader::with_capacity(64 << 10, file);
    let mut buf = Vec::new();
    let mut line = 0usize;
    loop {
        line += 1;
        buf.clear();
        let n = (&mut reader)
            .take(MAX_RECORD_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| DataError(format!("{}:{line}: cannot read: {e}", path.display())))?;
        if n == 0 {
            return Ok(());
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        } else if buf.len() > MAX_RECORD_BYTES {
            return Err(DataError(format!(
                "{}:{line}: the line is longer than {}, the most Kiln reads as one record; data files hold one record per line (JSONL: one JSON object per line), so split it into several records",
                path.display(),
                size(MAX_RECORD_BYTES as u64)
            )));
        }
        let bytes = if line == 1 {
            buf.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&buf)
        } else {
            &buf
        };
        let text = std::str::from_utf8(bytes).map_err(|e| {
            DataError(format!(
                "{}:{line}: not UTF-8 text (an invalid byte at column {}); data files must be UTF-8",
                path.display(),
                e.valid_up_to() + 1
            ))
        })?;
        each(line, text)?;
    }
}

/// One JSON value from line `line` of `path`.
pub(super) fn parse_record(path: &Path, line: usize, text: &str) -> Result<Value, DataError> {
    serde_json::from_str(text)
        .map_err(|e| DataError(format!("{}:{line}: not a JSON record: {e}", path.display())))
}

/// What kind of JSON value `v` is, for messages.
pub(super) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The string field `key` of a record; a missing field (with the fields the record has) or one
/// of another type is an error naming the file and line.
pub(super) fn text_field<'r>(
    record: &'r Value,
    key: &str,
    path: &Path,
    line: usize,
) -> Result<&'r str, DataError> {
    match record.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(DataError(format!(
            "{}:{line}: the field `{key}` is {}, not a string",
            path.display(),
            json_kind(other)
        ))),
        None => {
            let known: Vec<String> = record
                .as_object()
                .map(|m| m.keys().map(|k| format!("`{k}`")).collect())
                .unwrap_or_default();
            Err(DataError(format!(
                "{}:{line}: the record has no text field `{key}` (it has {}); name the field the data uses in `data {{ fields = {{ ... }} }}`",
                path.display(),
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            )))
        }
    }
}

/// Records of a JSONL file with their line numbers, read line by line (see [`for_each_line`]);
/// blank lines are skipped. A line that is not JSON, and a file without records, are errors
/// naming the file (and line).
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Value)>, DataError> {
    let mut out = Vec::new();
    for_each_line(path, |line, text| {
        if !text.trim().is_empty() {
            out.push((line, parse_record(path, line, text)?));
        }
        Ok(())
    })?;
    if out.is_empty() {
        return Err(DataError(format!(
            "{}: no records (the file is empty or has only blank lines)",
            path.display()
        )));
    }
    Ok(out)
}

/// The texts of a file: JSONL records (with their line numbers), each a JSON object, or a text
/// file's non-empty lines as records with a `text` field. A file without records is an error.
pub(super) fn records(path: &Path) -> Result<Vec<(usize, Value)>, DataError> {
    let mut out = Vec::new();
    for_each_record(path, |line, record| {
        out.push((line, record));
        Ok(())
    })?;
    Ok(out)
}

/// Calls `each` with every record of a file (see [`records`]) as it is read, so that a caller
/// that needs one record at a time never holds the file.
pub(super) fn for_each_record(
    path: &Path,
    mut each: impl FnMut(usize, Value) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let jsonl = is_jsonl(path);
    let mut any = false;
    for_each_line(path, |line, text| {
        if text.trim().is_empty() {
            return Ok(());
        }
        any = true;
        if !jsonl {
            return each(line, serde_json::json!({ "text": text }));
        }
        let record = parse_record(path, line, text)?;
        if !record.is_object() {
            return Err(DataError(format!(
                "{}:{line}: the record is {}; each line must be a JSON object such as {{\"text\": \"...\"}}",
                path.display(),
                json_kind(&record)
            )));
        }
        each(line, record)
    })?;
    if !any {
        return Err(DataError(format!(
            "{}: no records (the file is empty or has only blank lines)",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenizer::tests::scratch;

    #[test]
    fn malformed_jsonl_names_file_and_line() {
        let dir = std::env::temp_dir().join(format!("kiln-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad.jsonl");
        std::fs::write(&f, "{\"text\": \"ok\"}\n\n{\"text\": oops}\n").unwrap();
        let e = read_jsonl(&f).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).ok();
        assert!(e.contains("bad.jsonl:3: not a JSON record"), "{e}");
    }

    #[test]
    fn a_line_over_the_limit_is_an_error_naming_it_without_reading_it_whole() {
        let dir = scratch("long");
        let f = dir.0.join("long.jsonl");
        let mut text = String::from("{\"text\": \"fine\"}\n");
        text.push_str(&format!(
            "{{\"text\": \"{}\"}}\n",
            "a".repeat(MAX_RECORD_BYTES)
        ));
        text.push_str("{\"text\": \"after\"}\n");
        std::fs::write(&f, text).unwrap();
        let e = read_jsonl(&f).unwrap_err().to_string();
        assert!(
            e.contains("long.jsonl:2: the line is longer than 4 MiB"),
            "{e}"
        );
        // A line of exactly the limit (its newline not counted) is read.
        std::fs::write(&f, format!("{}\n", " ".repeat(MAX_RECORD_BYTES - 2) + "{}")).unwrap();
        assert_eq!(read_jsonl(&f).unwrap().len(), 1);
        // Text files are read the same way.
        let t = dir.0.join("long.txt");
        std::fs::write(&t, "x".repeat(MAX_RECORD_BYTES + 1)).unwrap();
        let e = records(&t).unwrap_err().to_string();
        assert!(
            e.contains("long.txt:1: the line is longer than 4 MiB"),
            "{e}"
        );
    }

    #[test]
    fn encodings_and_line_ends_are_checked() {
        let dir = scratch("utf8");
        let f = dir.0.join("bad.txt");
        std::fs::write(&f, b"good line\nbad \xff byte\n").unwrap();
        let e = records(&f).unwrap_err().to_string();
        assert!(
            e.contains("bad.txt:2: not UTF-8 text (an invalid byte at column 5)"),
            "{e}"
        );
        // A byte-order mark and Windows line ends are not part of the records.
        let f = dir.0.join("crlf.jsonl");
        std::fs::write(
            &f,
            b"\xEF\xBB\xBF{\"text\": \"a\"}\r\n\r\n{\"text\": \"b\"}\r\n",
        )
        .unwrap();
        let r = read_jsonl(&f).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].0, r[1].0), (1, 3), "line numbers count blank lines");
    }
}
