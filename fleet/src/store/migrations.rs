//! The schema migrations of each database, compiled into the binary. They are embedded with
//! `include_str!` rather than sqlx's `migrate!` macro, which would pull sqlx's compile-time
//! machinery (a second build of sqlx's drivers, rustls and tokio for the build host) into every
//! build. Each [`Migration`] is made as `migrate!` and sqlx's directory reader make it: the
//! version and description from the file name, the checksum over the SQL, so databases migrated
//! by either agree.

use std::borrow::Cow;

use futures::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

use super::Backend;

/// A migration file: its name (`NNNN_words.sql`) and its SQL.
type EmbeddedFile = (&'static str, &'static str);

const SQLITE: &[EmbeddedFile] = &[
    ("0001_initial.sql", include_str!("../../migrations/sqlite/0001_initial.sql")),
    ("0002_registry_rollouts.sql", include_str!("../../migrations/sqlite/0002_registry_rollouts.sql")),
    ("0003_jobs.sql", include_str!("../../migrations/sqlite/0003_jobs.sql")),
];

const POSTGRES: &[EmbeddedFile] = &[
    ("0001_initial.sql", include_str!("../../migrations/postgres/0001_initial.sql")),
    ("0002_registry_rollouts.sql", include_str!("../../migrations/postgres/0002_registry_rollouts.sql")),
    ("0003_jobs.sql", include_str!("../../migrations/postgres/0003_jobs.sql")),
];

/// The migrations of `backend`, in version order.
#[derive(Debug, Clone, Copy)]
pub(super) struct EmbeddedMigrations(pub(super) Backend);

impl EmbeddedMigrations {
    fn files(self) -> &'static [EmbeddedFile] {
        match self.0 {
            Backend::Sqlite => SQLITE,
            Backend::Postgres => POSTGRES,
        }
    }

    /// Every migration, checked: a file name without a version is a build mistake, said plainly.
    pub(super) fn migrations(self) -> Result<Vec<Migration>, String> {
        let mut migrations =
            self.files().iter().map(|&(name, sql)| migration(name, sql)).collect::<Result<Vec<_>, _>>()?;
        migrations.sort_by_key(|m| m.version);
        Ok(migrations)
    }

    /// A migrator of these migrations.
    pub(super) async fn migrator(self) -> Result<Migrator, sqlx::migrate::MigrateError> {
        Migrator::new(self).await
    }
}

impl MigrationSource<'static> for EmbeddedMigrations {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move { self.migrations().map_err(BoxDynError::from) })
    }
}

/// `NNNN_some_words.sql` → version NNNN, description "some words", as sqlx names them.
fn migration(file_name: &str, sql: &'static str) -> Result<Migration, String> {
    let (version, rest) = file_name
        .split_once('_')
        .filter(|(_, rest)| rest.ends_with(".sql"))
        .ok_or_else(|| format!("migration file {file_name:?} is not named NNNN_description.sql"))?;
    let version: i64 = version
        .parse()
        .map_err(|_| format!("migration file {file_name:?} does not start with a version number"))?;
    let description = rest.trim_end_matches(".sql").replace('_', " ");
    let no_transaction = sql.starts_with("-- no-transaction");
    Ok(Migration::new(
        version,
        Cow::Owned(description),
        MigrationType::Simple,
        Cow::Borrowed(sql),
        no_transaction,
    ))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// What sqlx's own directory reader (the one `migrate!` uses at build time) makes of a folder.
    async fn read_by_sqlx(dir: &str) -> Vec<Migration> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        Migrator::new(path.as_path()).await.unwrap().iter().cloned().collect()
    }

    fn same(a: &[Migration], b: &[Migration]) {
        let key = |m: &Migration| {
            (m.version, m.description.to_string(), m.checksum.to_vec(), m.no_tx, m.migration_type.label())
        };
        assert_eq!(a.iter().map(key).collect::<Vec<_>>(), b.iter().map(key).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn every_migration_file_is_embedded_exactly_as_sqlx_reads_the_folder() {
        same(
            &EmbeddedMigrations(Backend::Sqlite).migrations().unwrap(),
            &read_by_sqlx("migrations/sqlite").await,
        );
        same(
            &EmbeddedMigrations(Backend::Postgres).migrations().unwrap(),
            &read_by_sqlx("migrations/postgres").await,
        );
    }

    #[test]
    fn a_file_name_without_a_version_is_refused_with_its_name() {
        let error = migration("initial.sql", "").unwrap_err();
        assert!(error.contains("initial.sql"), "{error}");
        let error = migration("first_initial.sql", "").unwrap_err();
        assert!(error.contains("version number"), "{error}");
    }
}
