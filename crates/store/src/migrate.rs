//! Versioned schema migrations, embedded in the binary and tracked in `schema_migrations`.
//!
//! Each engine has its own SQL (`migrations/<engine>/NNNN_name.sql`) with the same version
//! numbers and the same logical schema. A migration is applied in one transaction together with
//! its `schema_migrations` row, so a crash never leaves a half-applied version behind.

/// One migration.
pub(crate) struct Migration {
    pub(crate) version: i64,
    pub(crate) name: &'static str,
    pub(crate) sql: &'static str,
}

/// SQLite migrations, in order.
pub(crate) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../migrations/sqlite/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "hub_cleanup",
        sql: include_str!("../migrations/sqlite/0002_hub_cleanup.sql"),
    },
    Migration {
        version: 3,
        name: "nodes",
        sql: include_str!("../migrations/sqlite/0003_nodes.sql"),
    },
    Migration {
        version: 4,
        name: "events",
        sql: include_str!("../migrations/sqlite/0004_events.sql"),
    },
];

/// PostgreSQL migrations, in order.
pub(crate) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../migrations/postgres/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "hub_cleanup",
        sql: include_str!("../migrations/postgres/0002_hub_cleanup.sql"),
    },
    Migration {
        version: 3,
        name: "nodes",
        sql: include_str!("../migrations/postgres/0003_nodes.sql"),
    },
    Migration {
        version: 4,
        name: "events",
        sql: include_str!("../migrations/postgres/0004_events.sql"),
    },
];

/// The schema version this binary migrates to.
pub const SCHEMA_VERSION: i64 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_engines_have_the_same_versions_ending_at_schema_version() {
        let s: Vec<_> = SQLITE.iter().map(|m| (m.version, m.name)).collect();
        let p: Vec<_> = POSTGRES.iter().map(|m| (m.version, m.name)).collect();
        assert_eq!(s, p);
        assert!(s.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(s.last().map(|m| m.0), Some(SCHEMA_VERSION));
    }
}
