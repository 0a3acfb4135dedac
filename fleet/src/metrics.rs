//! Prometheus metrics of the fleet, one struct shared by every part. Each part bumps its own
//! counters where it logs the matching event, so logs and metrics say the same thing.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The OpenMetrics text format `prometheus-client` writes (Prometheus reads it).
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A `reason` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// A `result` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// An `action` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: &'static str,
}

/// An `outcome` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// A `transition` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub transition: &'static str,
}

/// Every metric of the fleet.
#[derive(Debug)]
pub struct FleetMetrics {
    registry: Registry,
    /// Telemetry messages taken in, by `result` (`stored`, `rejected`).
    pub ingest_messages: Family<ResultLabels, Counter>,
    /// Telemetry events, by `result` (`stored`, `duplicate`, `rejected`).
    pub ingest_events: Family<ResultLabels, Counter>,
    /// Messages or events refused, by `reason`.
    pub bad_messages: Family<ReasonLabels, Counter>,
    /// Time to write one batch (one transaction).
    pub db_write_seconds: Histogram,
    /// Failed batch writes (each retried).
    pub db_write_errors: Counter,
    /// Messages validated and waiting to be written.
    pub ingest_queue_depth: Gauge<i64, AtomicI64>,
    /// From an event's `at_ms` on the device to its commit in the database.
    pub ingest_lag_seconds: Histogram,
    /// Open MQTT connections to the embedded broker.
    pub broker_connections: Gauge<i64, AtomicI64>,
    /// Connection attempts to the embedded broker, by `result`.
    pub broker_connects: Family<ResultLabels, Counter>,
    /// Publishes and subscriptions the topic ACL refused, by `action`.
    pub acl_denied: Family<ActionLabels, Counter>,
    /// Offload requests, by `outcome` (`answer`, `refused`, `error`, `expired`, `replayed`, `busy`,
    /// `invalid`).
    pub gateway_requests: Family<OutcomeLabels, Counter>,
    /// Upstream time of answered offloads.
    pub gateway_upstream_seconds: Histogram,
    /// Offloads being answered now.
    pub gateway_in_flight: Gauge<i64, AtomicI64>,
    /// Rollout transitions, by `transition` (`started`, `stage_advanced`, `completed`, `halted`,
    /// `paused`, `resumed`, `aborted`).
    pub rollout_transitions: Family<TransitionLabels, Counter>,
    /// Model assignments published by rollouts, by `kind` (`new`, `rollback`, `late_device`).
    pub rollout_assignments: Family<KindLabels, Counter>,
}

/// A `kind` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

impl FleetMetrics {
    /// The metrics, registered.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("tandem_fleet");
        let metrics = Self {
            ingest_messages: Family::default(),
            ingest_events: Family::default(),
            bad_messages: Family::default(),
            // 0.5 ms … ~16 s.
            db_write_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            db_write_errors: Counter::default(),
            ingest_queue_depth: Gauge::default(),
            // 1 ms … ~9 h: a device back from a long time offline delivers old events.
            ingest_lag_seconds: Histogram::new(exponential_buckets(0.001, 2.5, 18)),
            broker_connections: Gauge::default(),
            broker_connects: Family::default(),
            acl_denied: Family::default(),
            gateway_requests: Family::default(),
            // 10 ms … ~5 min.
            gateway_upstream_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 15)),
            gateway_in_flight: Gauge::default(),
            rollout_transitions: Family::default(),
            rollout_assignments: Family::default(),
            registry: Registry::default(),
        };
        registry.register("ingest_messages", "Telemetry messages taken in", metrics.ingest_messages.clone());
        registry.register("ingest_events", "Telemetry events taken in", metrics.ingest_events.clone());
        registry.register(
            "bad_messages",
            "Telemetry messages or events refused",
            metrics.bad_messages.clone(),
        );
        registry.register(
            "db_write_seconds",
            "Time to write one ingest batch",
            metrics.db_write_seconds.clone(),
        );
        registry.register(
            "db_write_errors",
            "Failed ingest batch writes (retried)",
            metrics.db_write_errors.clone(),
        );
        registry.register(
            "ingest_queue_depth",
            "Validated messages waiting to be written",
            metrics.ingest_queue_depth.clone(),
        );
        registry.register(
            "ingest_lag_seconds",
            "From an event on the device to its database commit",
            metrics.ingest_lag_seconds.clone(),
        );
        registry.register(
            "broker_connections",
            "Open connections to the embedded broker",
            metrics.broker_connections.clone(),
        );
        registry.register(
            "broker_connects",
            "Connection attempts to the embedded broker",
            metrics.broker_connects.clone(),
        );
        registry.register(
            "acl_denied",
            "Publishes and subscriptions refused by the topic ACL",
            metrics.acl_denied.clone(),
        );
        registry.register("gateway_requests", "Offload requests", metrics.gateway_requests.clone());
        registry.register(
            "gateway_upstream_seconds",
            "Upstream time of answered offloads",
            metrics.gateway_upstream_seconds.clone(),
        );
        registry.register("gateway_in_flight", "Offloads being answered", metrics.gateway_in_flight.clone());
        registry.register("rollout_transitions", "Rollout transitions", metrics.rollout_transitions.clone());
        registry.register(
            "rollout_assignments",
            "Model assignments published by rollouts",
            metrics.rollout_assignments.clone(),
        );
        Arc::new(Self { registry, ..metrics })
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String");
        text
    }

    /// Counts one rollout transition.
    pub fn rollout_transition(&self, transition: &'static str) {
        self.rollout_transitions.get_or_create(&TransitionLabels { transition }).inc();
    }

    /// Counts `n` assignments of `kind`.
    pub fn rollout_assigned(&self, kind: &'static str, n: usize) {
        self.rollout_assignments.get_or_create(&KindLabels { kind }).inc_by(n as u64);
    }

    /// Counts one refused message or event.
    pub fn bad(&self, reason: &'static str) {
        self.bad_messages.get_or_create(&ReasonLabels { reason }).inc();
    }
}
