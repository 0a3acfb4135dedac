//! A plain subscriber that counts telemetry messages and discards them: the broker's own delivery
//! ceiling, measured the same way the fleet consumes (MQTT 5, QoS 1, acknowledged at once).

use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde::Serialize;
use tandem_core::protocol::{DeviceTopics, TopicKind};

/// Where to subscribe and for how long.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    pub host: String,
    pub port: u16,
    /// Stop after this long without a message (once the first arrived).
    pub idle: Duration,
    /// Stop after this long in any case.
    pub limit: Duration,
}

/// What arrived.
#[derive(Debug, Clone, Serialize)]
pub struct SinkReport {
    pub messages: u64,
    pub bytes: u64,
    /// From the first to the last message.
    pub seconds: f64,
    pub messages_per_second: f64,
}

/// Counts until idle; `ready` is told once the subscription is in place.
pub async fn run_sink(options: SinkOptions, ready: tokio::sync::oneshot::Sender<()>) -> SinkReport {
    let mut mqtt =
        MqttOptions::new(format!("tandem-sink-{}", std::process::id()), options.host, options.port);
    mqtt.set_keep_alive(Duration::from_secs(30))
        .set_receive_maximum(Some(2000))
        .set_max_packet_size(Some(16 << 20));
    let (client, mut events) = AsyncClient::new(mqtt, 4096);
    let filter = DeviceTopics::all_devices(TopicKind::Telemetry);
    let started = Instant::now();
    let (mut first, mut last) = (None::<Instant>, Instant::now());
    let (mut messages, mut bytes) = (0u64, 0u64);
    let mut ready = Some(ready);
    loop {
        let wait = match first {
            Some(_) => options.idle.saturating_sub(last.elapsed()),
            None => options.limit.saturating_sub(started.elapsed()),
        };
        if wait.is_zero() || started.elapsed() > options.limit {
            break;
        }
        match tokio::time::timeout(wait, events.poll()).await {
            Err(_) => break,
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                let _ = client.try_subscribe_many([Filter::new(filter.clone(), QoS::AtLeastOnce)]);
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            }
            Ok(Ok(Event::Incoming(Packet::Publish(publish)))) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                messages += 1;
                bytes += publish.payload.len() as u64;
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let seconds = first.map_or(0.0, |first| (last - first).as_secs_f64());
    SinkReport { messages, bytes, seconds, messages_per_second: messages as f64 / seconds.max(1e-9) }
}
