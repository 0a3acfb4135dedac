//! Query parameters: times in Unix ms, durations as `250ms`, `30s`, `5m`, `1h`, `1d` or plain ms.

use serde::Deserialize;
use tandem_core::protocol::Route;

use super::error::ApiError;
use crate::store::{EventFilter, GroupBy, StatsQuery, now_ms};

const DAY_MS: i64 = 86_400_000;

/// A duration parameter in ms.
pub fn parse_duration_ms(text: &str) -> Result<i64, ApiError> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: i64 =
        number.parse().map_err(|_| ApiError::BadRequest(format!("`{text}` is not a duration")))?;
    let scale = match unit {
        "" | "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => DAY_MS,
        _ => return Err(ApiError::BadRequest(format!("`{text}`: the unit must be ms, s, m, h or d"))),
    };
    number
        .checked_mul(scale)
        .filter(|ms| *ms > 0)
        .ok_or_else(|| ApiError::BadRequest(format!("`{text}` is out of range")))
}

/// `/v1/stats` parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsParams {
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub bucket: Option<String>,
    pub group_by: Option<GroupBy>,
    pub device: Option<String>,
    pub model_version: Option<String>,
    pub group: Option<String>,
}

impl StatsParams {
    pub fn query(self) -> Result<StatsQuery, ApiError> {
        let to = self.to.unwrap_or_else(|| now_ms() + 1);
        let from = self.from.unwrap_or(to - DAY_MS);
        if from >= to {
            return Err(ApiError::BadRequest("`from` must be before `to`".into()));
        }
        let bucket_ms = self.bucket.as_deref().map(parse_duration_ms).transpose()?;
        if let Some(bucket) = bucket_ms
            && (to - from) / bucket > 10_000
        {
            return Err(ApiError::BadRequest("more than 10000 buckets: choose a wider `bucket`".into()));
        }
        Ok(StatsQuery {
            from_ms: from,
            to_ms: to,
            bucket_ms,
            group_by: self.group_by.unwrap_or_default(),
            device: self.device,
            model_version: self.model_version,
            group: self.group,
        })
    }
}

/// `/v1/events` parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventParams {
    pub device: Option<String>,
    pub model_version: Option<String>,
    pub route: Option<Route>,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub after: Option<uuid::Uuid>,
    pub limit: Option<u32>,
}

impl EventParams {
    pub fn filter(&self) -> EventFilter {
        EventFilter {
            device: self.device.clone(),
            model_version: self.model_version.clone(),
            route: self.route,
            from_ms: self.from,
            to_ms: self.to,
        }
    }
}

/// `/v1/dashboard` parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardParams {
    /// How far back, e.g. `1h` (default `24h`).
    pub window: Option<String>,
    /// Chart resolution; default: about 60 points over the window.
    pub bucket: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration_ms("250").unwrap(), 250);
        assert_eq!(parse_duration_ms("30s").unwrap(), 30_000);
        assert_eq!(parse_duration_ms("5m").unwrap(), 300_000);
        assert_eq!(parse_duration_ms("1d").unwrap(), DAY_MS);
        assert!(parse_duration_ms("1w").is_err());
        assert!(parse_duration_ms("0").is_err());
        assert!(parse_duration_ms("-5s").is_err());
    }
}
