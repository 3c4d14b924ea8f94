//! dps-store: the storage backends of dps, implementing [`dps_core::store::Store`].
//!
//! This crate owns the on-disk schema and its versioned migrations (embedded in the binary,
//! tracked in `schema_migrations`), and two engines behind the one port:
//!
//! - [`SqliteStore`]: embedded SQLite in WAL mode. One dedicated writer thread owns the write
//!   connection and does *group commit*: it drains every queued write, applies each with its own
//!   [`Expect`](dps_core::store::Expect) check inside one transaction, commits once, and only
//!   then answers the waiters. Reads use a small pool of read-only connections on
//!   `spawn_blocking`. `synchronous=FULL` by default, so an acknowledged write survives a crash.
//! - [`PostgresStore`]: tokio-postgres behind a deadpool pool; every conditional write is a single
//!   statement (`INSERT .. ON CONFLICT`, `UPDATE .. WHERE etag = $n`). Concurrent `write_all`
//!   calls of the registration path's shape (a condition on the first write only) are
//!   group-committed by the store: one transaction of a few multi-row statements per batch, each
//!   call still holding or failing on its own condition. TLS with rustls and libpq's
//!   `sslmode`/`sslrootcert`/`sslcert`/`sslkey` ([`pg_tls`]).
//!
//! [`open`] picks the engine from a URL. The crate depends only on `dps-core`; it knows nothing of
//! HTTP, MQTT or configuration files.
//!
//! Notes on the contract as implemented here:
//! - Keys are `id.to_lowercase()`, compared bytewise (PostgreSQL columns use `COLLATE "C"`), so
//!   both engines page in the same order.
//! - The group index is stored lowercased (the filter is case-insensitive), so a returned
//!   [`DocIndex::group`](dps_core::store::DocIndex) is lowercase; the body is untouched.
//! - `query` limits are clamped to `1..=10_000`; `AuditQuery::limit == 0` means 100.
//! - An audit entry appended with an empty timestamp gets the current time.

mod migrate;
pub mod pg_tls;
mod postgres;
mod sql;
mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dps_core::store::{Store, StoreError};

pub use migrate::SCHEMA_VERSION;
pub use postgres::{Change, PostgresOptions, PostgresStore, CHANGES_CHANNEL};
pub use sqlite::{SqliteOptions, SqliteStore, Synchronous};

/// File name of the default SQLite database inside the data directory.
pub const DEFAULT_SQLITE_FILE: &str = "dps.sqlite3";

/// The accepted forms of a store URL, for error messages.
pub const ACCEPTED_URLS: &str = "`postgres://…` or `postgresql://…` (PostgreSQL), `sqlite://PATH` \
     or a plain file path (SQLite), or empty for `<data_dir>/dps.sqlite3`";

/// Failure to open a store.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL's scheme names no engine we have.
    #[error("unsupported store URL `{url}`: expected {ACCEPTED_URLS}")]
    UnsupportedUrl {
        /// The URL, password redacted.
        url: String,
    },
    /// A URL option is not understood.
    #[error("invalid store URL `{url}`: {reason}")]
    InvalidOption {
        /// The URL, password redacted.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The parent directory of the database file could not be created.
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// SQLite failed to open or configure the database.
    #[error("cannot open SQLite database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// The SQLite writer thread could not be started.
    #[error("cannot start the SQLite writer thread for {path}: {source}")]
    WriterThread {
        /// The database file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The PostgreSQL URL could not be parsed.
    #[error("invalid PostgreSQL URL `{url}`: {source}")]
    PostgresUrl {
        /// The URL, password redacted.
        url: String,
        /// The parse error.
        source: tokio_postgres::Error,
    },
    /// PostgreSQL could not be reached or refused a setup statement.
    #[error("cannot use PostgreSQL at `{url}`: {}", error_chain(.source))]
    Postgres {
        /// The URL, password redacted.
        url: String,
        /// The driver error.
        source: tokio_postgres::Error,
    },
    /// The connection pool could not be built or gave no connection.
    #[error("cannot get a PostgreSQL connection for `{url}`: {reason}")]
    PostgresPool {
        /// The URL, password redacted.
        url: String,
        /// The pool error, formatted.
        reason: String,
    },
    /// A migration failed.
    #[error("{engine} migration {version} failed on `{location}`: {reason}")]
    Migration {
        /// `sqlite` or `postgres`.
        engine: &'static str,
        /// Database path or redacted URL.
        location: String,
        /// The migration version that failed.
        version: i64,
        /// The error, formatted.
        reason: String,
    },
    /// The database was migrated by a newer dps.
    #[error(
        "the {engine} database at `{location}` has schema version {found}, but this dps supports \
         up to {supported}; upgrade dps"
    )]
    SchemaTooNew {
        /// `sqlite` or `postgres`.
        engine: &'static str,
        /// Database path or redacted URL.
        location: String,
        /// Version found.
        found: i64,
        /// Newest version known to this binary.
        supported: i64,
    },
}

/// An error and its sources, `: `-separated, skipping a source whose text its parent already
/// shows (tokio-postgres hides the cause of a failed handshake or a server refusal in its
/// source).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// Which engine a URL selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// SQLite database file, with options from the URL's query (`?synchronous=normal`).
    Sqlite(PathBuf, SqliteOptions),
    /// PostgreSQL connection URL.
    Postgres(String),
}

/// Parse a store URL or path (see [`ACCEPTED_URLS`]) without opening anything.
pub fn parse_target(url_or_path: &str, data_dir: &Path) -> Result<Target, OpenError> {
    let s = url_or_path.trim();
    if s.is_empty() {
        return Ok(Target::Sqlite(
            data_dir.join(DEFAULT_SQLITE_FILE),
            SqliteOptions::default(),
        ));
    }
    let lower = s.to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        return Ok(Target::Postgres(s.to_owned()));
    }
    if lower.starts_with("sqlite://") {
        let rest = &s["sqlite://".len()..];
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        if path.is_empty() {
            return Err(OpenError::InvalidOption {
                url: redact_url(s),
                reason: "missing database path after `sqlite://`".into(),
            });
        }
        let mut opts = SqliteOptions::default();
        for pair in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match (k, v.to_ascii_lowercase().as_str()) {
                ("synchronous", "full") => opts.synchronous = Synchronous::Full,
                ("synchronous", "normal") => opts.synchronous = Synchronous::Normal,
                _ => {
                    return Err(OpenError::InvalidOption {
                        url: redact_url(s),
                        reason: format!(
                            "unknown option `{pair}` (accepted: synchronous=full|normal)"
                        ),
                    })
                }
            }
        }
        return Ok(Target::Sqlite(PathBuf::from(path), opts));
    }
    if has_url_scheme(s) {
        return Err(OpenError::UnsupportedUrl { url: redact_url(s) });
    }
    Ok(Target::Sqlite(PathBuf::from(s), SqliteOptions::default()))
}

/// Does `s` start with `scheme:` (RFC 3986 scheme of two or more characters, so that Windows drive
/// letters such as `C:\` still read as paths)?
fn has_url_scheme(s: &str) -> bool {
    let Some((scheme, _)) = s.split_once(':') else {
        return false;
    };
    scheme.len() >= 2
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Hide the password of a URL (in the userinfo or a `password=` query parameter), so that
/// URLs can be logged and put in errors: the one rule of [`dps_core::redact::scrub`].
pub fn redact_url(url: &str) -> String {
    dps_core::redact::scrub(url).into_owned()
}

/// An opened store with its concrete engine, for callers that need more than the port (the
/// schema version for `/readyz`).
#[derive(Clone)]
pub enum Backend {
    /// SQLite.
    Sqlite(Arc<SqliteStore>),
    /// PostgreSQL.
    Postgres(Arc<PostgresStore>),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Sqlite(s) => f.debug_tuple("Sqlite").field(&s.path()).finish(),
            Backend::Postgres(p) => f.debug_tuple("Postgres").field(&p.url()).finish(),
        }
    }
}

impl Backend {
    /// The store as the port.
    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            Backend::Sqlite(s) => s.clone(),
            Backend::Postgres(p) => p.clone(),
        }
    }

    /// The schema version recorded in the database.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        match self {
            Backend::Sqlite(s) => s.schema_version().await,
            Backend::Postgres(p) => p.schema_version().await,
        }
    }

    /// Changes of cached data made by any node, as they commit (PostgreSQL `LISTEN/NOTIFY`);
    /// `None` for SQLite, which serves one node (its own changes invalidate its caches directly).
    pub fn watch_changes(&self) -> Option<tokio::sync::mpsc::Receiver<Change>> {
        match self {
            Backend::Sqlite(_) => None,
            Backend::Postgres(p) => Some(p.watch_changes()),
        }
    }

    /// Are the migrations current (the database is at [`SCHEMA_VERSION`])? For `/readyz`.
    pub async fn migrations_current(&self) -> Result<bool, StoreError> {
        Ok(self.schema_version().await? == SCHEMA_VERSION)
    }
}

/// Open a store and apply pending migrations; see [`open`].
pub async fn open_backend(url_or_path: &str, data_dir: &Path) -> Result<Backend, OpenError> {
    match parse_target(url_or_path, data_dir)? {
        Target::Sqlite(path, opts) => {
            let store = tokio::task::spawn_blocking(move || SqliteStore::open_with(&path, opts))
                .await
                .map_err(|e| OpenError::WriterThread {
                    path: PathBuf::from(url_or_path),
                    source: std::io::Error::other(e.to_string()),
                })??;
            Ok(Backend::Sqlite(Arc::new(store)))
        }
        Target::Postgres(url) => Ok(Backend::Postgres(Arc::new(
            PostgresStore::open_with(&url, PostgresOptions::default()).await?,
        ))),
    }
}

/// Open a store and apply pending migrations.
///
/// `postgres://…` or `postgresql://…` selects PostgreSQL; `sqlite://PATH` (optionally
/// `?synchronous=normal`) or a plain path selects SQLite, creating the file and its parent
/// directory; an empty string means `data_dir/dps.sqlite3`. Any other scheme is an error: a typo
/// never silently creates a file.
pub async fn open(url_or_path: &str, data_dir: &Path) -> Result<Arc<dyn Store>, OpenError> {
    Ok(open_backend(url_or_path, data_dir).await?.store())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_userinfo_and_query_passwords() {
        assert_eq!(
            redact_url("postgres://u:s3cret@h:5432/db"),
            "postgres://u:<redacted>@h:5432/db"
        );
        assert_eq!(
            redact_url("postgres://u@h/db?password=x&sslmode=disable"),
            "postgres://u@h/db?password=<redacted>&sslmode=disable"
        );
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn targets_are_chosen_by_scheme() {
        let d = Path::new("/data");
        assert_eq!(
            parse_target("", d).unwrap(),
            Target::Sqlite("/data/dps.sqlite3".into(), SqliteOptions::default())
        );
        assert_eq!(
            parse_target("/x/y.db", d).unwrap(),
            Target::Sqlite("/x/y.db".into(), SqliteOptions::default())
        );
        let Target::Sqlite(p, o) = parse_target("sqlite:///x/y.db?synchronous=normal", d).unwrap()
        else {
            panic!("not sqlite")
        };
        assert_eq!(p, PathBuf::from("/x/y.db"));
        assert_eq!(o.synchronous, Synchronous::Normal);
        assert!(matches!(
            parse_target("postgresql://h/db", d).unwrap(),
            Target::Postgres(_)
        ));
        assert!(matches!(
            parse_target("POSTGRES://h/db", d).unwrap(),
            Target::Postgres(_)
        ));
    }

    #[test]
    fn unknown_scheme_is_an_error_naming_url_and_forms() {
        let e = parse_target("mysql://u:pw@h/db", Path::new("/d")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("mysql://u:<redacted>@h/db"), "{msg}");
        assert!(!msg.contains("pw@"), "{msg}");
        assert!(msg.contains("sqlite://PATH"), "{msg}");
        assert!(parse_target("postgress:h", Path::new("/d")).is_err());
        assert!(parse_target("sqlite://x?sync=1", Path::new("/d")).is_err());
    }
}
