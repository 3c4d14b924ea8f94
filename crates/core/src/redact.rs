//! The one redaction rule: which values are secrets, how they are hidden, and how a hidden
//! value written back by a client (GET → modify → PUT) is kept instead of overwritten.
//!
//! A field is secret by its **name** ([`is_secret_name`]): compared case-insensitively with
//! `_` and `-` ignored, a name that ends in `key`, `secret` or `password` (or a plural), or is a
//! `connectionString` (or ends in one), or `sig`. Public keys are exempt: the TPM
//! `endorsementKey` and `storageRootKey` and any `publicKey`. Names such as `keyName`,
//! `key_file` or `password_mode` do not end in a secret word and stay visible.
//!
//! Free text (error messages, hub `last_error`, URLs) goes through [`scrub`], which hides the
//! values of `SharedAccessKey=`, `AccountKey=`, `sig=`, `secret=`, `password=` fragments and the
//! password of a URL's `user:password@`.
//!
//! Everything here is pure.

use serde_json::{Map, Value};
use std::borrow::Cow;

/// What a hidden value reads as.
pub const REDACTED: &str = "<redacted>";

/// Secret-looking names whose values are public.
const PUBLIC_NAMES: &[&str] = &[
    "endorsementkey",
    "storagerootkey",
    "publickey",
    "publickeys",
];

/// Is a field with this name a secret?
pub fn is_secret_name(name: &str) -> bool {
    let n: String = name
        .chars()
        .filter(|c| *c != '_' && *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if PUBLIC_NAMES.iter().any(|p| n.ends_with(p)) {
        return false;
    }
    ["key", "secret", "password"]
        .iter()
        .any(|w| n.ends_with(w) || n.strip_suffix('s').is_some_and(|n| n.ends_with(w)))
        || n.ends_with("connectionstring")
        || n == "sig"
}

/// Hide, in place, every secret of a JSON value (see the module documentation). Strings and
/// numbers under a secret name become [`REDACTED`]; `null` stays `null`; objects are walked by
/// their own names; arrays under a secret name have every scalar hidden.
pub fn redact_in_place(v: &mut Value) {
    walk(v, false);
}

fn walk(v: &mut Value, secret: bool) {
    match v {
        Value::Object(m) => redact_map_in_place(m),
        Value::Array(a) => a.iter_mut().for_each(|x| walk(x, secret)),
        Value::String(_) | Value::Number(_) | Value::Bool(_) if secret => {
            *v = Value::String(REDACTED.into())
        }
        Value::String(s) => {
            if let Cow::Owned(clean) = scrub(s) {
                *s = clean;
            }
        }
        _ => {}
    }
}

/// [`redact_in_place`] for an object's fields.
pub fn redact_map_in_place(m: &mut Map<String, Value>) {
    for (k, val) in m.iter_mut() {
        walk(val, is_secret_name(k));
    }
}

/// A copy of `v` with every secret hidden.
pub fn redact(mut v: Value) -> Value {
    redact_in_place(&mut v);
    v
}

/// Does the value carry a secret [`redact`] would hide (a placeholder counts as hidden)?
pub fn contains_placeholder(v: &Value) -> bool {
    match v {
        Value::String(s) => s == REDACTED,
        Value::Array(a) => a.iter().any(contains_placeholder),
        Value::Object(m) => m.values().any(contains_placeholder),
        _ => false,
    }
}

/// Fragments whose value [`scrub`] hides: `name=value`, the value ending at `;`, `&`, a quote,
/// white space, `,` or a closing bracket.
const FRAGMENTS: &[&str] = &[
    "sharedaccesskey=",
    "accountkey=",
    "sig=",
    "secret=",
    "password=",
];

fn value_end(b: &[u8], from: usize) -> usize {
    b[from..]
        .iter()
        .position(|c| {
            matches!(
                c,
                b';' | b'&' | b'"' | b'\'' | b',' | b'}' | b')' | b']' | b'>'
            ) || c.is_ascii_whitespace()
        })
        .map_or(b.len(), |p| from + p)
}

/// Hide secret fragments of free text: `SharedAccessKey=…`, `AccountKey=…`, `sig=…`,
/// `secret=…`, `password=…` (names case-insensitive, not preceded by a letter or digit) and the
/// password of `scheme://user:password@host`. Borrowed when there was nothing to hide.
pub fn scrub(s: &str) -> Cow<'_, str> {
    let b = s.as_bytes();
    let lower = s.to_ascii_lowercase();
    let lb = lower.as_bytes();
    // (start, end) of every value to hide, in order.
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let at_word = i == 0 || !b[i - 1].is_ascii_alphanumeric();
        let frag = at_word
            .then(|| FRAGMENTS.iter().find(|f| lb[i..].starts_with(f.as_bytes())))
            .flatten();
        if let Some(f) = frag {
            let mut start = i + f.len();
            let end = match b.get(start) {
                // A quoted value ends at its closing quote.
                Some(q @ (b'"' | b'\'')) => {
                    start += 1;
                    b[start..]
                        .iter()
                        .position(|c| c == q)
                        .map_or(b.len(), |p| start + p)
                }
                _ => value_end(b, start),
            };
            if end > start && !s[start..].starts_with(REDACTED) {
                cuts.push((start, end));
            }
            i = end.max(start);
            continue;
        }
        if lb[i..].starts_with(b"://") {
            // scheme://user:password@host: the authority ends at '/', '?', '#' or a separator.
            let auth_start = i + 3;
            let auth_end = b[auth_start..]
                .iter()
                .position(|c| matches!(c, b'/' | b'?' | b'#') || c.is_ascii_whitespace())
                .map_or(b.len(), |p| auth_start + p);
            let auth = &b[auth_start..auth_end];
            if let Some(at) = auth.iter().rposition(|c| *c == b'@') {
                if let Some(colon) = auth[..at].iter().position(|c| *c == b':') {
                    let (start, end) = (auth_start + colon + 1, auth_start + at);
                    if end > start && &s[start..end] != REDACTED {
                        cuts.push((start, end));
                    }
                }
            }
            i = auth_start;
            continue;
        }
        i += 1;
    }
    if cuts.is_empty() {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    for (start, end) in cuts {
        if start < last {
            continue;
        }
        out.push_str(&s[last..start]);
        out.push_str(REDACTED);
        last = end;
    }
    out.push_str(&s[last..]);
    Cow::Owned(out)
}

/// A placeholder was written back where nothing is stored to keep.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{path}' is \"<redacted>\" but there is no stored value to keep; send the secret itself")]
pub struct NothingToKeep {
    /// Where (`linked_hub[host].options.secret`).
    pub path: String,
}

/// Fields that identify an element of an array of objects (matched case-insensitively), so that
/// a reordered list still finds its stored secrets.
const IDENTITY_FIELDS: &[&str] = &["name", "host", "id", "registrationId", "enrollmentGroupId"];

fn identity(v: &Value) -> Option<(&'static str, &str)> {
    IDENTITY_FIELDS
        .iter()
        .find_map(|f| v.get(*f).and_then(Value::as_str).map(|s| (*f, s)))
}

/// Keep the stored secrets a client wrote back hidden: every [`REDACTED`] string in `new` is
/// replaced by the value at the same place in `old` (array elements matched by their `name`,
/// `host` or `id`, else by position). Fails, naming the place, when `old` has nothing there.
pub fn restore(new: &mut Value, old: Option<&Value>) -> Result<(), NothingToKeep> {
    restore_at(new, old, &mut String::new())
}

fn restore_at(
    new: &mut Value,
    old: Option<&Value>,
    path: &mut String,
) -> Result<(), NothingToKeep> {
    match new {
        Value::String(s) if s == REDACTED => match old {
            Some(o @ (Value::String(_) | Value::Number(_) | Value::Bool(_)))
                if o.as_str() != Some(REDACTED) =>
            {
                *new = o.clone();
                Ok(())
            }
            _ => Err(NothingToKeep {
                path: path.trim_start_matches('.').to_string(),
            }),
        },
        Value::Object(m) => {
            for (k, v) in m.iter_mut() {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                restore_at(v, old.and_then(|o| o.get(k)), path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Array(a) => {
            let olds = old.and_then(Value::as_array);
            for (i, v) in a.iter_mut().enumerate() {
                let id = identity(v).map(|(f, s)| (f, s.to_string()));
                let o = match (&id, olds) {
                    (Some((f, s)), Some(olds)) => olds.iter().find(|o| {
                        o.get(*f)
                            .and_then(Value::as_str)
                            .is_some_and(|x| x.eq_ignore_ascii_case(s))
                    }),
                    (None, Some(olds)) => olds.get(i),
                    _ => None,
                };
                let len = path.len();
                match &id {
                    Some((_, s)) => path.push_str(&format!("[{s}]")),
                    None => path.push_str(&format!("[{i}]")),
                }
                restore_at(v, o, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secret_names() {
        for n in [
            "primaryKey",
            "secondary_key",
            "key",
            "sharedAccessKey",
            "apiKey",
            "private-key",
            "secret",
            "clientSecret",
            "password",
            "connection_string",
            "connectionString",
            "sig",
            "keys",
            "clientSecrets",
        ] {
            assert!(is_secret_name(n), "{n}");
        }
        for n in [
            "endorsementKey",
            "storageRootKey",
            "publicKey",
            "keyName",
            "key_file",
            "password_mode",
            "name",
            "symmetricKeyType",
            "sha256Thumbprint",
            "continuationToken",
        ] {
            assert!(!is_secret_name(n), "{n}");
        }
    }

    #[test]
    fn redacts_by_name_at_any_depth_and_keeps_public_keys() {
        let v = json!({
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "s1", "secondaryKey": null},
                            "tpm": {"endorsementKey": "ek", "storageRootKey": "srk"}},
            "access_policy": [{"name": "p", "primary_key": "k"}],
            "linked_hub": [{"host": "h", "connection_string": "HostName=h;SharedAccessKey=abc",
                            "options": {"secret": "w", "keys": ["a", "b"], "key_file": "/k.pem", "retries": 3}}],
            "note": "see sig=abc&se=1",
        });
        let r = redact(v);
        assert_eq!(r["attestation"]["symmetricKey"]["primaryKey"], REDACTED);
        assert_eq!(
            r["attestation"]["symmetricKey"]["secondaryKey"],
            Value::Null
        );
        assert_eq!(r["attestation"]["type"], "symmetricKey");
        assert_eq!(r["attestation"]["tpm"]["endorsementKey"], "ek");
        assert_eq!(r["attestation"]["tpm"]["storageRootKey"], "srk");
        assert_eq!(r["access_policy"][0]["primary_key"], REDACTED);
        assert_eq!(r["access_policy"][0]["name"], "p");
        let h = &r["linked_hub"][0];
        assert_eq!(h["connection_string"], REDACTED);
        assert_eq!(h["options"]["secret"], REDACTED);
        assert_eq!(h["options"]["keys"], json!([REDACTED, REDACTED]));
        assert_eq!(h["options"]["key_file"], "/k.pem");
        assert_eq!(h["options"]["retries"], 3);
        assert_eq!(r["note"], "see sig=<redacted>&se=1");
    }

    #[test]
    fn scrubs_fragments_of_free_text() {
        let cases = [
            (
                "HostName=h.net;SharedAccessKeyName=owner;SharedAccessKey=c2VjcmV0==",
                "HostName=h.net;SharedAccessKeyName=owner;SharedAccessKey=<redacted>",
            ),
            (
                "SharedAccessSignature sr=x&sig=abc%2B&se=1&skn=p",
                "SharedAccessSignature sr=x&sig=<redacted>&se=1&skn=p",
            ),
            (
                "connect mqtt://admin:hunter2@127.0.0.1:1883 failed",
                "connect mqtt://admin:<redacted>@127.0.0.1:1883 failed",
            ),
            (
                "postgres://u:pw@db/x?password=pw2",
                "postgres://u:<redacted>@db/x?password=<redacted>",
            ),
            (
                "DefaultEndpointsProtocol=https;AccountKey=abc;x=y",
                "DefaultEndpointsProtocol=https;AccountKey=<redacted>;x=y",
            ),
            (
                "{\"secret\": \"x\", secret=\"y z\"}",
                "{\"secret\": \"x\", secret=\"<redacted>\"}",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(scrub(input), want, "{input}");
        }
        for clean in [
            "nothing here",
            "https://example.com/hook",
            "mqtt://admin@h:1883",
            "xsig=abc",
            "SharedAccessKeyName=p",
            "SharedAccessKey=<redacted>",
            "",
        ] {
            assert!(matches!(scrub(clean), Cow::Borrowed(_)), "{clean}");
        }
    }

    #[test]
    fn restore_keeps_stored_secrets_and_refuses_placeholders_without_one() {
        let old = json!({"access_policy": [{"name": "a", "primary_key": "ka"}, {"name": "b", "primary_key": "kb"}],
                         "linked_hub": [{"host": "H", "connection_string": "cs", "options": {"secret": "w"}}]});
        let mut new = json!({"access_policy": [{"name": "b", "primary_key": REDACTED}, {"name": "a", "primary_key": "new"}],
                             "linked_hub": [{"host": "h", "connection_string": REDACTED, "options": {"secret": REDACTED, "retries": 2}}]});
        restore(&mut new, Some(&old)).unwrap();
        assert_eq!(new["access_policy"][0]["primary_key"], "kb");
        assert_eq!(new["access_policy"][1]["primary_key"], "new");
        assert_eq!(new["linked_hub"][0]["connection_string"], "cs");
        assert_eq!(new["linked_hub"][0]["options"]["secret"], "w");
        assert!(!contains_placeholder(&new));

        let mut orphan =
            json!({"linked_hub": [{"host": "other", "options": {"secret": REDACTED}}]});
        let e = restore(&mut orphan, Some(&old)).unwrap_err();
        assert_eq!(e.path, "linked_hub[other].options.secret");
        let mut none = json!({"secret": REDACTED});
        assert!(restore(&mut none, None).is_err());
        // A stored placeholder is not a secret to keep.
        assert!(restore(&mut none, Some(&json!({"secret": REDACTED}))).is_err());
    }
}
