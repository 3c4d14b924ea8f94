//! Printing a command's result: the API's JSON (`--output json`) or a table, and the one-line
//! confirmations of commands that change something.

use crate::table::{cell, render};
use crate::{Globals, OutputFormat};
use serde_json::{json, Value};

/// Writes `text` to standard output. A reader that went away (`dps … | head`, `| grep -q`) is
/// not an error of ours: the process ends quietly with success, as `cat` would, instead of
/// `println!`'s panic on a broken pipe.
pub(crate) fn print_out(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write to standard output: {e}");
            std::process::exit(1)
        }
    }
}

/// Print JSON or a table.
pub(crate) fn emit(g: &Globals, v: &Value, table: impl FnOnce(&Value) -> String) {
    match g.output {
        OutputFormat::Json => print_out(&format!(
            "{}\n",
            serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
        )),
        OutputFormat::Table => print_out(&table(v)),
    }
}

/// Print a configuration read back (a list or show command) as JSON or a table, secrets hidden
/// by the one rule of [`dps_core::redact`] whatever the server sent: only create and rotate
/// commands print a secret, once.
pub(crate) fn emit_config(g: &Globals, v: &Value, table: impl FnOnce(&Value) -> String) {
    let v = dps_core::redact::redact(v.clone());
    emit(g, &v, table)
}

/// Print a list as JSON or as a table: one row per item, a column per header, each cell the
/// first of its JSON pointers that exists. Secrets are hidden as by [`emit_config`].
pub(crate) fn emit_list(g: &Globals, items: &[Value], headers: &[&str], cols: &[&[&str]]) {
    let v = dps_core::redact::redact(Value::Array(items.to_vec()));
    let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
    emit(g, &v, |_| {
        let rows: Vec<Vec<String>> = items
            .iter()
            .map(|it| cols.iter().map(|ptrs| cell(it, ptrs)).collect())
            .collect();
        render(headers, &rows)
    });
}

/// Print what was done: `{"result": …}` in JSON, the sentence in a table.
pub(crate) fn done(g: &Globals, what: String) {
    match g.output {
        OutputFormat::Json => print_out(&format!("{}\n", json!({"result": what}))),
        OutputFormat::Table => print_out(&format!("{what}\n")),
    }
}
