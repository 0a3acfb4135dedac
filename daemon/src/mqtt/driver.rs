//! The task that owns rumqttc's event loop for an [`super::MqttLink`]: polls it, reconnects with
//! backoff, and turns its events into link state (connected or not, PUBACKs resolved, messages
//! dispatched, subscriptions and status restored on every CONNACK).

use std::sync::Arc;

use tandem_core::protocol::{TopicKind, parse_device_topic};
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::client::{EventLoop, LinkEvent, OutgoingPublish, ReceivedPublish};
use super::link::{INBOUND_KINDS, Shared};
use super::{InboundMessage, MqttLinkError};

/// Runs until `stop` is cancelled, or until the DISCONNECT of a shutdown went out.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut events: EventLoop,
    mut backoff: Backoff,
    stop: CancellationToken,
) {
    let mut outage = Outage::Starting;
    loop {
        let polled = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            polled = events.poll() => polled,
        };
        match polled {
            Ok(LinkEvent::DisconnectSent) if shared.is_closing() => break,
            Ok(event) => {
                if let LinkEvent::Connected { session_present } = &event {
                    outage.connected(&shared, *session_present);
                    backoff.reset();
                }
                handle(&shared, event);
            }
            Err(error) => {
                lose_connection(&shared, &mut events);
                let pause = backoff.next_pause();
                outage.failed(&shared, &error, pause);
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
    shared.close();
}

/// Logging state, so that an outage is logged once and not on every retry.
enum Outage {
    /// No connection yet since the start.
    Starting,
    /// Connected.
    Up,
    /// Disconnected, and the outage was logged.
    Logged,
}

impl Outage {
    fn connected(&mut self, shared: &Shared, session_present: bool) {
        let url = &shared.url;
        match self {
            Outage::Starting => tracing::info!(%url, session_present, "connected to the MQTT broker"),
            Outage::Logged => tracing::info!(%url, session_present, "reconnected to the MQTT broker"),
            Outage::Up => {}
        }
        *self = Outage::Up;
    }

    fn failed(&mut self, shared: &Shared, error: &str, retry_in: std::time::Duration) {
        let url = &shared.url;
        match self {
            Outage::Up => {
                tracing::warn!(%url, %error, "lost the connection to the MQTT broker; reconnecting")
            }
            Outage::Starting => {
                tracing::warn!(%url, %error, "cannot connect to the MQTT broker; retrying in the background")
            }
            Outage::Logged => tracing::debug!(%url, %error, ?retry_in, "MQTT reconnection attempt failed"),
        }
        *self = Outage::Logged;
    }
}

/// The connection is gone: nothing queued or in flight will be acknowledged, so fail it now.
fn lose_connection(shared: &Shared, events: &mut EventLoop) {
    shared.set_connected(false);
    let mut acks = shared.acks();
    events.drop_unsent();
    for waiter in acks.drain() {
        let _gone = waiter.send(Err(MqttLinkError::ConnectionLost));
    }
}

fn handle(shared: &Shared, event: LinkEvent) {
    match event {
        LinkEvent::Connected { .. } => {
            shared.set_connected(true);
            restore_session(shared);
        }
        LinkEvent::PublishSent(pkid) => {
            if !shared.acks().sent(pkid) {
                tracing::debug!(pkid, "a publish went out that the link did not queue");
            }
        }
        LinkEvent::PublishHeldBack(pkid) => shared.acks().collided(pkid),
        LinkEvent::PubAck { pkid, refused } => {
            let waiter = shared.acks().acknowledged(pkid);
            match (waiter, refused) {
                (Some(waiter), None) => {
                    let _gone = waiter.send(Ok(()));
                }
                (Some(waiter), Some(reason)) => {
                    let _gone = waiter.send(Err(MqttLinkError::Rejected(reason)));
                }
                (None, Some(reason)) => tracing::warn!(pkid, %reason, "the MQTT broker refused a publish"),
                (None, None) => {}
            }
        }
        LinkEvent::SubAck { refused } if !refused.is_empty() => {
            tracing::error!(?refused, "the MQTT broker refused the device's subscriptions (check its ACL)");
        }
        LinkEvent::Message(message) => receive(shared, message),
        LinkEvent::SubAck { .. } | LinkEvent::DisconnectSent | LinkEvent::Other => {}
    }
}

/// On every CONNACK: subscribe again (a broker that lost the session lost them too) and publish
/// the retained online status.
fn restore_session(shared: &Shared) {
    let filters: Vec<String> = INBOUND_KINDS.iter().map(|kind| shared.topics.topic(*kind)).collect();
    if shared.client().try_subscribe(&filters).is_err() {
        tracing::error!("could not queue the MQTT subscriptions; they are retried on the next connection");
    }
    let online = shared.status(true);
    let status = OutgoingPublish {
        topic: shared.topics.topic(TopicKind::Status),
        payload: online.to_payload(),
        retain: true,
        response_topic: None,
        correlation_data: None,
        message_expiry: None,
    };
    if let Err(error) = shared.enqueue(status, None) {
        tracing::warn!(%error, "could not publish the online status");
    }
}

fn receive(shared: &Shared, message: ReceivedPublish) {
    let kind = match parse_device_topic(&message.topic) {
        Some((device, kind)) if device == shared.topics.device_id() && INBOUND_KINDS.contains(&kind) => kind,
        _ => {
            tracing::debug!(topic = %message.topic, "ignoring a message on a topic the link does not serve");
            return;
        }
    };
    shared.dispatch(InboundMessage {
        kind,
        topic: message.topic,
        payload: message.payload,
        retained: message.retain,
        correlation_data: message.correlation_data,
    });
}
