//! Printing a command's result: the API's JSON (`--output json`) or a table, and the one-line
//! confirmations of commands that change something.

use crate::table::{cell, render};
use crate::{Globals, OutputFormat};
use serde_json::{json, Value};

/// Print JSON or a table.
pub(crate) fn emit(g: &Globals, v: &Value, table: impl FnOnce(&Value) -> String) {
    match g.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
        ),
        OutputFormat::Table => print!("{}", table(v)),
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
        OutputFormat::Json => println!("{}", json!({"result": what})),
        OutputFormat::Table => println!("{what}"),
    }
}
