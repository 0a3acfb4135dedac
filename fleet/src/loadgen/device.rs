//! One simulated device: an MQTT 3.1.1 connection (rumqttc's packet codec over a plain TCP
//! stream), QoS 1 telemetry with its own packet ids, and everything unacknowledged sent again
//! after each reconnect. When following assignments, it subscribes to its retained assignment
//! topic, installs each new version (`super::update`), and reports where the install stands in its
//! retained status, the way `tandemd` does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand::Rng;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{self, Packet};
use tandem_core::protocol::{
    ChatMessage, DeviceStatus, DeviceTopics, ModelAssignment, OffloadRequest, OffloadResponse,
    PROTOCOL_VERSION, Route, TelemetryBatch, TelemetryBudget, TelemetryEvent, TokenCounts, TopicKind,
    Transport, UpdateReport, UpdateState, parse_device_topic,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::update::Installer;
use super::{Counters, LoadOptions};
use crate::store::now_ms;

const KEEP_ALIVE_SECS: u16 = 30;
const MAX_PACKET: usize = 16 * 1024 * 1024;

/// A message sent and not yet acknowledged.
struct Unacked {
    topic: String,
    payload: Bytes,
    events: Vec<Uuid>,
    sent: Instant,
}

pub(crate) struct SimulatedDevice {
    pub id: String,
    pub options: LoadOptions,
    pub counters: Arc<Counters>,
    pub acked: Option<mpsc::UnboundedSender<Vec<Uuid>>>,
    /// Set when following assignments.
    pub installer: Option<Arc<Installer>>,
    /// Cancelled: stop publishing now (then drain as after `publish_until`).
    pub stop: CancellationToken,
    pub start_delay: Duration,
    pub publish_until: Instant,
    pub give_up_at: Instant,
}

struct State {
    unacked: BTreeMap<u16, Unacked>,
    /// Status messages (QoS 1) not yet acknowledged; never sent again: the next connection
    /// publishes the current status instead.
    status_pkids: HashSet<u16>,
    next_pkid: u16,
    /// Offload requests waiting for their answer.
    asked: HashMap<Uuid, Instant>,
    /// When this device saw `stop`.
    stopped_at: Option<Instant>,
    /// The model version it serves (in its status and its telemetry).
    serving: String,
    /// Its latest report on an assignment.
    update: Option<UpdateReport>,
    /// The install in progress: its version and task.
    installing: Option<(String, tokio::task::JoinHandle<()>)>,
    /// Install reports, from the install task to the connection.
    reports: mpsc::UnboundedSender<UpdateReport>,
    reports_rx: mpsc::UnboundedReceiver<UpdateReport>,
}

impl State {
    fn pkid(&mut self) -> u16 {
        loop {
            let pkid = self.next_pkid;
            self.next_pkid = if self.next_pkid == u16::MAX { 1 } else { self.next_pkid + 1 };
            if !self.unacked.contains_key(&pkid) && !self.status_pkids.contains(&pkid) {
                return pkid;
            }
        }
    }
}

impl SimulatedDevice {
    /// Runs the device to its end; returns the model version it serves then.
    pub async fn run(self) -> String {
        tokio::time::sleep(self.start_delay).await;
        let (reports, reports_rx) = mpsc::unbounded_channel();
        let mut state = State {
            unacked: BTreeMap::new(),
            status_pkids: HashSet::new(),
            next_pkid: 1,
            asked: HashMap::new(),
            stopped_at: None,
            serving: self.options.model_version.clone(),
            update: None,
            installing: None,
            reports,
            reports_rx,
        };
        let mut first = true;
        let mut backoff = Duration::from_millis(50);
        loop {
            let publishing = self.publishing(&mut state);
            if !publishing && state.unacked.is_empty() || Instant::now() >= self.give_up_at(&state) {
                break;
            }
            if !first {
                self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            first = false;
            match self.connection(&mut state).await {
                Ok(()) => break,
                Err(_) => continue,
            }
        }
        self.counters.messages_unacked.fetch_add(state.unacked.len() as u64, Ordering::Relaxed);
        if let Some((_, task)) = state.installing.take() {
            task.abort();
        }
        state.serving
    }

    /// Whether it still publishes telemetry; notes when it first saw `stop`.
    fn publishing(&self, state: &mut State) -> bool {
        if self.stop.is_cancelled() {
            state.stopped_at.get_or_insert_with(Instant::now);
            return false;
        }
        Instant::now() < self.publish_until
    }

    /// When it stops waiting for acknowledgements.
    fn give_up_at(&self, state: &State) -> Instant {
        match state.stopped_at {
            Some(at) => self.give_up_at.min(at + self.options.drain),
            None => self.give_up_at,
        }
    }

    /// Its retained status: online or not, and when following assignments, the version it
    /// serves and its latest update report.
    fn status(&self, state: &State, online: bool) -> Vec<u8> {
        let mut status = DeviceStatus::new(self.id.clone(), online);
        if self.installer.is_some() {
            status.model_version = Some(state.serving.clone());
            status.update.clone_from(&state.update);
        }
        status.to_payload()
    }

    /// Publishes the current status, retained, QoS 1.
    fn publish_status(
        &self,
        state: &mut State,
        topics: &DeviceTopics,
        out: &mut BytesMut,
    ) -> std::io::Result<()> {
        let pkid = state.pkid();
        let mut publish =
            v4::Publish::new(topics.topic(TopicKind::Status), QoS::AtLeastOnce, self.status(state, true));
        publish.pkid = pkid;
        publish.retain = true;
        Packet::Publish(publish).write(out, MAX_PACKET).map_err(|e| std::io::Error::other(e.to_string()))?;
        state.status_pkids.insert(pkid);
        Ok(())
    }

    /// An assignment arrived (retained ones again after each reconnect).
    fn assigned(&self, state: &mut State, assignment: ModelAssignment) {
        let Some(installer) = &self.installer else { return };
        let installing = state
            .installing
            .as_ref()
            .is_some_and(|(v, task)| *v == assignment.version && !task.is_finished());
        let settled = state.serving == assignment.version
            && state.update.as_ref().is_none_or(|u| u.version == assignment.version);
        if installing || settled {
            return;
        }
        if let Some((_, task)) = state.installing.take() {
            task.abort();
        }
        self.counters.assignments.fetch_add(1, Ordering::Relaxed);
        let installer = installer.clone();
        let reports = state.reports.clone();
        let version = assignment.version.clone();
        let id = self.id.clone();
        let task = tokio::spawn(async move { installer.install(&id, assignment, reports).await });
        state.installing = Some((version, task));
    }

    /// An install reached a new state: report it; once active, serve the version and send
    /// telemetry from it at once (the rollout counts a device healthy on its first events).
    fn install_report(
        &self,
        state: &mut State,
        report: UpdateReport,
        topics: &DeviceTopics,
        out: &mut BytesMut,
    ) -> std::io::Result<()> {
        if state.installing.as_ref().is_none_or(|(v, _)| *v != report.version) {
            return Ok(()); // from an install that a newer assignment replaced
        }
        let active = report.state == UpdateState::Active;
        if active {
            state.serving = report.version.clone();
        }
        if matches!(report.state, UpdateState::Active | UpdateState::Failed) {
            state.installing = None;
        }
        state.update = Some(report);
        self.publish_status(state, topics, out)?;
        if active && self.publishing(state) {
            self.publish_batch(state, topics, out)?;
        }
        Ok(())
    }

    /// One connection: returns `Ok` when the device is done, `Err` when the connection broke.
    async fn connection(&self, state: &mut State) -> std::io::Result<()> {
        let broken = |what: &str| std::io::Error::other(what.to_string());
        let mut stream =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&self.options.broker))
                .await
                .map_err(|_| broken("connect timeout"))??;
        stream.set_nodelay(true)?;
        let mut out = BytesMut::with_capacity(64 * 1024);
        let mut connect = v4::Connect::new(self.id.clone());
        connect.keep_alive = KEEP_ALIVE_SECS;
        connect.clean_session = true;
        if let Some(password) = &self.options.password {
            connect.set_login(self.id.clone(), password.clone());
        }
        let topics = DeviceTopics::new(&self.id).ok_or_else(|| broken("invalid device id"))?;
        let will = DeviceStatus::new(self.id.clone(), false).to_payload();
        connect.last_will =
            Some(v4::LastWill::new(topics.topic(TopicKind::Status), will, QoS::AtLeastOnce, true));
        Packet::Connect(connect).write(&mut out, MAX_PACKET).map_err(|e| broken(&e.to_string()))?;
        stream.write_all(&out).await?;
        out.clear();
        let mut input = BytesMut::with_capacity(16 * 1024);
        let connack = tokio::time::timeout(Duration::from_secs(10), read_packet(&mut stream, &mut input))
            .await
            .map_err(|_| broken("no CONNACK"))??;
        match connack {
            Packet::ConnAck(ack) if ack.code == v4::ConnectReturnCode::Success => {}
            other => return Err(broken(&format!("refused: {other:?}"))),
        }
        state.status_pkids.clear();
        if self.installer.is_some() {
            self.publish_status(state, &topics, &mut out)?;
        } else {
            let online =
                v4::Publish::new(topics.topic(TopicKind::Status), QoS::AtMostOnce, self.status(state, true));
            Packet::Publish(v4::Publish { retain: true, ..online })
                .write(&mut out, MAX_PACKET)
                .map_err(|e| broken(&e.to_string()))?;
        }
        let mut filters = Vec::new();
        if self.options.offload_rate > 0.0 {
            filters.push(topics.topic(TopicKind::OffloadResponse));
        }
        if self.installer.is_some() {
            filters.push(topics.topic(TopicKind::Assignment));
        }
        for filter in filters {
            let mut subscribe = v4::Subscribe::new(filter, QoS::AtLeastOnce);
            subscribe.pkid = state.pkid();
            state.status_pkids.insert(subscribe.pkid);
            Packet::Subscribe(subscribe).write(&mut out, MAX_PACKET).map_err(|e| broken(&e.to_string()))?;
        }
        // Everything unacknowledged goes again, oldest first, with its packet id.
        for (pkid, message) in &state.unacked {
            let mut publish =
                v4::Publish::from_bytes(message.topic.clone(), QoS::AtLeastOnce, message.payload.clone());
            publish.pkid = *pkid;
            publish.dup = true;
            Packet::Publish(publish).write(&mut out, MAX_PACKET).map_err(|e| broken(&e.to_string()))?;
        }
        stream.write_all(&out).await?;
        out.clear();

        let per_device_rate = self.options.rate / self.options.devices.max(1) as f64;
        let interval = if per_device_rate > 0.0 {
            Duration::from_secs_f64(self.options.batch as f64 / per_device_rate)
        } else {
            Duration::from_millis(1)
        };
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let per_device_offloads = self.options.offload_rate / self.options.devices.max(1) as f64;
        let mut offloads = tokio::time::interval(if per_device_offloads > 0.0 {
            Duration::from_secs_f64(1.0 / per_device_offloads)
        } else {
            Duration::from_secs(3600)
        });
        offloads.set_missed_tick_behavior(MissedTickBehavior::Delay);
        offloads.reset();
        let mut pings = tokio::time::interval(Duration::from_secs(u64::from(KEEP_ALIVE_SECS) / 2));
        pings.reset();
        let (mut reader, mut writer) = stream.into_split();
        loop {
            let publishing = self.publishing(state);
            if !publishing && state.unacked.is_empty() {
                let offline = v4::Publish::new(
                    topics.topic(TopicKind::Status),
                    QoS::AtMostOnce,
                    DeviceStatus::new(self.id.clone(), false).to_payload(),
                );
                let _ = Packet::Publish(v4::Publish { retain: true, ..offline }).write(&mut out, MAX_PACKET);
                let _ = Packet::Disconnect.write(&mut out, MAX_PACKET);
                let _ = writer.write_all(&out).await;
                return Ok(());
            }
            let give_up_at = self.give_up_at(state);
            if Instant::now() >= give_up_at {
                return Ok(());
            }
            let room = state.unacked.len() < self.options.max_in_flight;
            tokio::select! {
                _ = ticks.tick(), if publishing && room => {
                    self.publish_batch(state, &topics, &mut out)?;
                }
                _ = offloads.tick(), if publishing && per_device_offloads > 0.0 => {
                    self.publish_offload(state, &topics, &mut out)?;
                }
                _ = pings.tick() => {
                    Packet::PingReq.write(&mut out, MAX_PACKET).map_err(|e| broken(&e.to_string()))?;
                }
                read = reader.read_buf(&mut input) => {
                    if read? == 0 {
                        return Err(broken("closed by the broker"));
                    }
                    loop {
                        match Packet::read(&mut input, MAX_PACKET) {
                            Ok(packet) => self.received(state, packet, &mut out)?,
                            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                            Err(e) => return Err(broken(&e.to_string())),
                        }
                    }
                }
                report = state.reports_rx.recv() => {
                    if let Some(report) = report {
                        self.install_report(state, report, &topics, &mut out)?;
                    }
                }
                () = self.stop.cancelled(), if publishing => {}
                () = tokio::time::sleep_until(give_up_at.into()) => return Ok(()),
            }
            if !out.is_empty() {
                writer.write_all(&out).await?;
                out.clear();
            }
        }
    }

    fn publish_batch(
        &self,
        state: &mut State,
        topics: &DeviceTopics,
        out: &mut BytesMut,
    ) -> std::io::Result<()> {
        let events: Vec<TelemetryEvent> =
            (0..self.options.batch).map(|_| self.event(&state.serving)).collect();
        let ids = events.iter().map(|e| e.id).collect();
        let batch = TelemetryBatch { v: PROTOCOL_VERSION, device_id: self.id.clone(), events };
        let payload = Bytes::from(serde_json::to_vec(&batch).expect("batches serialise"));
        let topic = topics.topic(TopicKind::Telemetry);
        let pkid = state.pkid();
        let mut publish = v4::Publish::from_bytes(topic.clone(), QoS::AtLeastOnce, payload.clone());
        publish.pkid = pkid;
        Packet::Publish(publish).write(out, MAX_PACKET).map_err(|e| std::io::Error::other(e.to_string()))?;
        state.unacked.insert(pkid, Unacked { topic, payload, events: ids, sent: Instant::now() });
        self.counters.messages_sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn publish_offload(
        &self,
        state: &mut State,
        topics: &DeviceTopics,
        out: &mut BytesMut,
    ) -> std::io::Result<()> {
        let request = OffloadRequest {
            v: PROTOCOL_VERSION,
            request_id: Uuid::now_v7(),
            device_id: self.id.clone(),
            model_version: state.serving.clone(),
            messages: vec![ChatMessage { role: "user".into(), content: "What is 6 * 7?".into() }],
            max_tokens: 16,
            temperature: None,
            local_attempt: None,
            deadline_ms: u64::try_from(now_ms()).unwrap_or(0) + 30_000,
        };
        state.asked.insert(request.request_id, Instant::now());
        let payload = serde_json::to_vec(&request).expect("requests serialise");
        // QoS 0: a lost request is a timeout on a real device too; it is counted as unanswered.
        let publish = v4::Publish::new(topics.topic(TopicKind::OffloadRequest), QoS::AtMostOnce, payload);
        Packet::Publish(publish).write(out, MAX_PACKET).map_err(|e| std::io::Error::other(e.to_string()))?;
        self.counters.offload_sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn received(&self, state: &mut State, packet: Packet, out: &mut BytesMut) -> std::io::Result<()> {
        match packet {
            Packet::PubAck(ack) => {
                if state.status_pkids.remove(&ack.pkid) {
                    return Ok(());
                }
                if let Some(message) = state.unacked.remove(&ack.pkid) {
                    Counters::observe(&self.counters.ack_latency, message.sent.elapsed());
                    self.counters.messages_acked.fetch_add(1, Ordering::Relaxed);
                    self.counters.events_acked.fetch_add(message.events.len() as u64, Ordering::Relaxed);
                    if let Some(acked) = &self.acked {
                        let _ = acked.send(message.events);
                    }
                }
            }
            Packet::Publish(publish) => {
                if publish.qos == QoS::AtLeastOnce {
                    Packet::PubAck(v4::PubAck::new(publish.pkid))
                        .write(out, MAX_PACKET)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                }
                if self.installer.is_some()
                    && parse_device_topic(&publish.topic)
                        .is_some_and(|(_, kind)| kind == TopicKind::Assignment)
                    && let Ok(assignment) = serde_json::from_slice::<ModelAssignment>(&publish.payload)
                {
                    self.assigned(state, assignment);
                } else if let Ok(response) = serde_json::from_slice::<OffloadResponse>(&publish.payload)
                    && let Some(asked) = state.asked.remove(&response.request_id)
                {
                    Counters::observe(&self.counters.offload_latency, asked.elapsed());
                    self.counters.offload_answered.fetch_add(1, Ordering::Relaxed);
                }
            }
            Packet::SubAck(ack) => {
                state.status_pkids.remove(&ack.pkid);
            }
            _ => {}
        }
        Ok(())
    }

    /// A plausible event: mostly local answers, some cloud answers and fallbacks.
    fn event(&self, model_version: &str) -> TelemetryEvent {
        let mut rng = rand::rng();
        let roll: f64 = rng.random();
        let route = if roll < 0.72 {
            Route::Local
        } else if roll < 0.94 {
            Route::Cloud
        } else {
            Route::LocalFallback
        };
        let cloud = route == Route::Cloud;
        TelemetryEvent {
            id: Uuid::now_v7(),
            device_id: self.id.clone(),
            model_version: model_version.to_string(),
            at_ms: u64::try_from(now_ms()).unwrap_or(0),
            route,
            help_requested: route != Route::Local,
            help_probability: Some(if route == Route::Local {
                rng.random_range(0.0..0.4)
            } else {
                rng.random_range(0.5..1.0)
            }),
            local_tokens: TokenCounts {
                prompt: rng.random_range(20..200),
                completion: rng.random_range(10..120),
            },
            local_latency_ms: rng.random_range(80..900),
            cloud_tokens: if cloud {
                TokenCounts { prompt: rng.random_range(20..200), completion: rng.random_range(30..400) }
            } else {
                TokenCounts::default()
            },
            cloud_latency_ms: if cloud { rng.random_range(400..4000) } else { 0 },
            transport: cloud.then_some(Transport::Mqtt),
            budget: TelemetryBudget {
                cloud_share: rng.random_range(0.1..0.3),
                calls_available: rng.random_range(0..5),
            },
            error_class: (route == Route::LocalFallback).then(|| "budget_ratio".to_string()),
            prompt: None,
            local_answer: None,
            cloud_answer: None,
        }
    }
}

async fn read_packet(stream: &mut TcpStream, input: &mut BytesMut) -> std::io::Result<Packet> {
    loop {
        match Packet::read(input, MAX_PACKET) {
            Ok(packet) => return Ok(packet),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
        if stream.read_buf(input).await? == 0 {
            return Err(std::io::Error::other("closed by the broker"));
        }
    }
}
