//! The model registry's records: one row per registered bundle version.

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError};

/// A registered bundle.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelRecord {
    pub name: String,
    pub version: String,
    /// sha256 of its `manifest.json`, lower-case hex (what assignments carry).
    pub manifest_sha256: String,
    /// Bytes of every file it lists.
    pub size_bytes: i64,
    /// Files it lists (the manifest not counted).
    pub files: i64,
    /// Id of the trusted key that signed it.
    pub key_id: String,
    /// Unix ms.
    pub registered_at_ms: i64,
    /// The manifest's evaluation results (metric → value).
    pub evaluation: serde_json::Value,
    /// The manifest's provenance (parent version, source, training config and data digests).
    pub provenance: serde_json::Value,
}

const MODEL_COLUMNS: &str =
    "name, version, manifest_sha256, size_bytes, files, key_id, registered_at_ms, evaluation, provenance";

fn model_from_row(row: &AnyRow) -> Result<ModelRecord, StoreError> {
    let json = |column: &str| -> Result<serde_json::Value, StoreError> {
        let text: String = row.try_get(column)?;
        serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("models.{column}: {e}")))
    };
    Ok(ModelRecord {
        name: row.try_get("name")?,
        version: row.try_get("version")?,
        manifest_sha256: row.try_get("manifest_sha256")?,
        size_bytes: row.try_get("size_bytes")?,
        files: row.try_get("files")?,
        key_id: row.try_get("key_id")?,
        registered_at_ms: row.try_get("registered_at_ms")?,
        evaluation: json("evaluation")?,
        provenance: json("provenance")?,
    })
}

impl Store {
    /// Records `model`; false (and nothing written) when its name and version are taken.
    pub async fn insert_model(&self, model: &ModelRecord) -> Result<bool, StoreError> {
        let sql = format!(
            "INSERT INTO models ({MODEL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (name, version) DO NOTHING"
        );
        let done = sqlx::query(&sql)
            .bind(model.name.clone())
            .bind(model.version.clone())
            .bind(model.manifest_sha256.clone())
            .bind(model.size_bytes)
            .bind(model.files)
            .bind(model.key_id.clone())
            .bind(model.registered_at_ms)
            .bind(model.evaluation.to_string())
            .bind(model.provenance.to_string())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The registered bundle `name` `version`.
    pub async fn model(&self, name: &str, version: &str) -> Result<Option<ModelRecord>, StoreError> {
        let sql = format!("SELECT {MODEL_COLUMNS} FROM models WHERE name = $1 AND version = $2");
        let row = sqlx::query(&sql)
            .bind(name.to_string())
            .bind(version.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(model_from_row).transpose()
    }

    /// Every registered bundle, by name, then oldest first.
    pub async fn list_models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        let sql = format!("SELECT {MODEL_COLUMNS} FROM models ORDER BY name, registered_at_ms, version");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(model_from_row).collect()
    }
}
