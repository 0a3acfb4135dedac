//! When a template's job should start by itself: a pure function from the template's triggers and
//! what the store says (its previous job, the recent traffic per model version, the prompts
//! collected since) to a trigger or nothing. No I/O, so every rule is tested by plain values.

use crate::config::JobTemplate;
use crate::store::VersionTraffic;

/// What the rules read for one template.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observations {
    /// Now, Unix ms.
    pub now_ms: i64,
    /// When the template's newest job was created, if any.
    pub last_job_ms: Option<i64>,
    /// Whether a job of the template is queued or running.
    pub job_active: bool,
    /// Queries and cloud calls per model version in the call-ratio rule's period.
    pub traffic: Vec<VersionTraffic>,
    /// Opted-in prompts received since the newest job (or ever, without one).
    pub new_prompts: i64,
}

/// Why a job starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    /// `on_demand`, `schedule`, `call_ratio` or `new_prompts`.
    pub kind: &'static str,
    /// The reason in words.
    pub detail: String,
}

/// The first of the template's triggers that fires (schedule, call ratio, new prompts), or none;
/// never while one of its jobs is active.
pub fn evaluate(template: &JobTemplate, seen: &Observations) -> Option<Trigger> {
    if seen.job_active {
        return None;
    }
    if let Some(hours) = template.every_hours {
        let interval_ms = (hours * 3_600_000.0) as i64;
        let due = match seen.last_job_ms {
            None => true,
            Some(last) => seen.now_ms - last >= interval_ms,
        };
        if due {
            return Some(Trigger { kind: "schedule", detail: format!("every {hours} h") });
        }
    }
    if let Some(rule) = &template.call_ratio {
        let outside = seen
            .traffic
            .iter()
            .filter(|t| rule.model_version.as_ref().is_none_or(|v| *v == t.model_version))
            .filter(|t| t.queries > 0 && t.queries as u64 >= rule.min_events)
            .find_map(|t| {
                let ratio = t.cloud as f64 / t.queries as f64;
                (ratio < rule.low || ratio > rule.high).then_some((t, ratio))
            });
        // The traffic is measured from the template's previous job at the earliest
        // (`call_ratio_since`), so what triggered one job does not trigger the next.
        if let Some((traffic, ratio)) = outside {
            return Some(Trigger {
                kind: "call_ratio",
                detail: format!(
                    "model version {} had a call ratio of {ratio:.3} over {} events in the last {} s, outside \
                     [{}, {}]",
                    traffic.model_version, traffic.queries, rule.period_secs, rule.low, rule.high
                ),
            });
        }
    }
    if let Some(rule) = &template.new_prompts
        && rule.min > 0
        && u64::try_from(seen.new_prompts).unwrap_or(0) >= rule.min
    {
        return Some(Trigger {
            kind: "new_prompts",
            detail: format!(
                "{} new opted-in prompts since the last job (at least {})",
                seen.new_prompts, rule.min
            ),
        });
    }
    None
}

/// Where the call-ratio rule's period starts: `period_secs` before now, but never before the
/// template's newest job, so the traffic that triggered a job does not trigger the next one.
pub fn call_ratio_since(period_secs: u64, now_ms: i64, last_job_ms: Option<i64>) -> i64 {
    let start = now_ms - i64::try_from(period_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    last_job_ms.map_or(start, |last| start.max(last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CallRatioRule, NewPromptsRule};

    const HOUR: i64 = 3_600_000;

    fn template() -> JobTemplate {
        JobTemplate {
            name: "countdown".into(),
            run_config: "run.toml".into(),
            task_data: Vec::new(),
            held_out: Vec::new(),
            model: None,
            overrides: Default::default(),
            commands: vec!["true".into()],
            bundle: "{work_dir}/bundle".into(),
            signing_key: None,
            collected_days: 0,
            every_hours: None,
            call_ratio: None,
            new_prompts: None,
        }
    }

    fn band(min_events: u64) -> CallRatioRule {
        CallRatioRule { low: 0.1, high: 0.3, period_secs: 3600, min_events, model_version: None }
    }

    fn traffic(version: &str, queries: i64, cloud: i64) -> VersionTraffic {
        VersionTraffic { model_version: version.into(), queries, cloud }
    }

    #[test]
    fn a_template_without_triggers_never_fires() {
        let seen = Observations { now_ms: 100 * HOUR, new_prompts: 1000, ..Default::default() };
        assert_eq!(evaluate(&template(), &seen), None);
    }

    #[test]
    fn a_schedule_fires_at_once_then_every_interval() {
        let t = JobTemplate { every_hours: Some(6.0), ..template() };
        let first = Observations { now_ms: 10 * HOUR, ..Default::default() };
        assert_eq!(evaluate(&t, &first).unwrap().kind, "schedule");
        let early = Observations { now_ms: 10 * HOUR, last_job_ms: Some(5 * HOUR), ..Default::default() };
        assert_eq!(evaluate(&t, &early), None);
        let due = Observations { now_ms: 11 * HOUR, last_job_ms: Some(5 * HOUR), ..Default::default() };
        assert_eq!(evaluate(&t, &due).unwrap().kind, "schedule");
    }

    #[test]
    fn a_call_ratio_outside_the_band_fires_with_the_version_named() {
        let t = JobTemplate { call_ratio: Some(band(100)), ..template() };
        let high = Observations {
            traffic: vec![traffic("v1", 200, 20), traffic("v2", 200, 120)],
            ..Default::default()
        };
        let trigger = evaluate(&t, &high).unwrap();
        assert_eq!(trigger.kind, "call_ratio");
        assert!(trigger.detail.contains("v2") && trigger.detail.contains("0.600"), "{}", trigger.detail);
        let low = Observations { traffic: vec![traffic("v1", 200, 2)], ..Default::default() };
        assert_eq!(evaluate(&t, &low).unwrap().kind, "call_ratio");
    }

    #[test]
    fn a_call_ratio_inside_the_band_or_on_too_few_events_does_not_fire() {
        let t = JobTemplate { call_ratio: Some(band(100)), ..template() };
        let inside = Observations { traffic: vec![traffic("v1", 1000, 200)], ..Default::default() };
        assert_eq!(evaluate(&t, &inside), None);
        let edges = Observations {
            traffic: vec![traffic("v1", 100, 10), traffic("v2", 100, 30)],
            ..Default::default()
        };
        assert_eq!(evaluate(&t, &edges), None, "the band's ends are inside");
        let few = Observations { traffic: vec![traffic("v1", 99, 99)], ..Default::default() };
        assert_eq!(evaluate(&t, &few), None);
    }

    #[test]
    fn a_call_ratio_rule_for_one_version_ignores_the_others() {
        let rule = CallRatioRule { model_version: Some("v1".into()), ..band(10) };
        let t = JobTemplate { call_ratio: Some(rule), ..template() };
        let seen = Observations {
            traffic: vec![traffic("v1", 50, 10), traffic("v2", 50, 50)],
            ..Default::default()
        };
        assert_eq!(evaluate(&t, &seen), None);
    }

    #[test]
    fn enough_new_prompts_fire() {
        let t = JobTemplate { new_prompts: Some(NewPromptsRule { min: 500 }), ..template() };
        assert_eq!(evaluate(&t, &Observations { new_prompts: 499, ..Default::default() }), None);
        let trigger = evaluate(&t, &Observations { new_prompts: 500, ..Default::default() }).unwrap();
        assert_eq!(trigger.kind, "new_prompts");
    }

    #[test]
    fn nothing_fires_while_a_job_of_the_template_is_active() {
        let t = JobTemplate {
            every_hours: Some(1.0),
            call_ratio: Some(band(1)),
            new_prompts: Some(NewPromptsRule { min: 1 }),
            ..template()
        };
        let seen = Observations {
            now_ms: 100 * HOUR,
            job_active: true,
            traffic: vec![traffic("v1", 10, 10)],
            new_prompts: 10,
            ..Default::default()
        };
        assert_eq!(evaluate(&t, &seen), None);
    }

    #[test]
    fn the_call_ratio_period_starts_no_earlier_than_the_last_job() {
        assert_eq!(call_ratio_since(3600, 10 * HOUR, None), 9 * HOUR);
        assert_eq!(call_ratio_since(3600, 10 * HOUR, Some(9 * HOUR + 5)), 9 * HOUR + 5);
        assert_eq!(call_ratio_since(3600, 10 * HOUR, Some(HOUR)), 9 * HOUR);
    }
}
