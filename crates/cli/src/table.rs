//! A tiny aligned-column table printer, and helpers to pull cells out of JSON.

use serde_json::Value;

/// Render rows under headers with columns padded to their widest cell (two spaces apart).
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(c);
            if i + 1 < widths.len() {
                let pad = widths[i].saturating_sub(c.chars().count());
                l.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// A cell: the first of the JSON pointers (`/a/b`) that exists, as text; `-` when none does.
pub fn cell(v: &Value, pointers: &[&str]) -> String {
    for p in pointers {
        if let Some(x) = v.pointer(p) {
            if !x.is_null() {
                return text(x);
            }
        }
    }
    "-".to_string()
}

/// A JSON value as short text: strings bare, arrays comma-joined, other values as JSON.
pub fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => {
            if a.is_empty() {
                "-".into()
            } else {
                a.iter().map(text).collect::<Vec<_>>().join(",")
            }
        }
        other => other.to_string(),
    }
}

/// Flatten a JSON object into `dotted.path  value` rows (arrays of scalars stay on one line).
pub fn flatten(v: &Value) -> Vec<Vec<String>> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<Vec<String>>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&p, x, out);
                }
            }
            Value::Array(a) if a.iter().any(|x| x.is_object()) => {
                for (i, x) in a.iter().enumerate() {
                    walk(&format!("{prefix}[{i}]"), x, out);
                }
            }
            other => out.push(vec![prefix.to_string(), text(other)]),
        }
    }
    let mut out = Vec::new();
    walk("", v, &mut out);
    out
}

/// Print a JSON document as a FIELD/VALUE table.
pub fn render_object(v: &Value) -> String {
    render(&["FIELD", "VALUE"], &flatten(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn columns_align() {
        let t = render(
            &["ID", "STATUS"],
            &[
                vec!["device-0001".into(), "assigned".into()],
                vec!["d2".into(), "-".into()],
            ],
        );
        assert_eq!(
            t,
            "ID           STATUS\ndevice-0001  assigned\nd2           -\n"
        );
        assert_eq!(render(&["A"], &[]), "A\n");
    }

    #[test]
    fn cells_and_flattening() {
        let v = json!({"a": {"b": 1}, "hubs": ["h1", "h2"], "n": null, "list": [{"x": true}]});
        assert_eq!(cell(&v, &["/missing", "/a/b"]), "1");
        assert_eq!(cell(&v, &["/hubs"]), "h1,h2");
        assert_eq!(cell(&v, &["/n"]), "-");
        let rows = flatten(&v);
        assert!(rows.contains(&vec!["a.b".to_string(), "1".to_string()]));
        assert!(rows.contains(&vec!["list[0].x".to_string(), "true".to_string()]));
        assert!(render_object(&v).starts_with("FIELD"));
    }
}
