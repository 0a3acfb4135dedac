//! Fleet → device delivery inside the embedded broker: which client is connected under which
//! client id, which topics it subscribed to, and the retained message of each topic. The fleet's
//! own parts (the gateway, rollouts) publish through it as a [`DeviceLink`].

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tandem_core::protocol::{DeviceTopics, TopicKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::device_link::DeviceLink;

/// A message for one connected client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
    pub correlation_data: Option<Bytes>,
}

/// How the router reaches one connection.
#[derive(Debug, Clone)]
pub(crate) struct ClientHandle {
    pub connection: u64,
    pub deliveries: mpsc::Sender<Delivery>,
    /// Cancelled when a newer connection takes the client id over.
    pub taken_over: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    clients: HashMap<String, ClientHandle>,
    subscribers: HashMap<String, HashSet<String>>,
    retained: HashMap<String, Delivery>,
}

/// The router.
#[derive(Debug, Default)]
pub struct Router {
    state: Mutex<State>,
}

impl Router {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a few map operations that cannot leave the maps torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a connection under `client_id`; an older connection with the same id is told to
    /// close.
    pub(crate) fn register(&self, client_id: &str, handle: ClientHandle) {
        let mut state = self.lock();
        if let Some(old) = state.clients.insert(client_id.to_string(), handle) {
            old.taken_over.cancel();
        }
        for subscribers in state.subscribers.values_mut() {
            subscribers.remove(client_id);
        }
    }

    /// Forgets `client_id` and its subscriptions, unless a newer connection took it over.
    pub(crate) fn unregister(&self, client_id: &str, connection: u64) {
        let mut state = self.lock();
        if state.clients.get(client_id).is_some_and(|h| h.connection == connection) {
            state.clients.remove(client_id);
            state.subscribers.retain(|_, subscribers| {
                subscribers.remove(client_id);
                !subscribers.is_empty()
            });
        }
    }

    /// Subscribes `client_id` to the exact topic `topic`; returns its retained message, if any.
    pub(crate) fn subscribe(&self, client_id: &str, topic: &str) -> Option<Delivery> {
        let mut state = self.lock();
        state.subscribers.entry(topic.to_string()).or_default().insert(client_id.to_string());
        state.retained.get(topic).cloned()
    }

    pub(crate) fn unsubscribe(&self, client_id: &str, topic: &str) {
        let mut state = self.lock();
        if let Some(subscribers) = state.subscribers.get_mut(topic) {
            subscribers.remove(client_id);
        }
    }

    /// Delivers to every subscriber of `delivery.topic` (and keeps it when retained; an empty
    /// retained payload clears the retained message). Returns how many clients it was queued for.
    pub fn publish(&self, delivery: Delivery) -> usize {
        let mut state = self.lock();
        if delivery.retain {
            if delivery.payload.is_empty() {
                state.retained.remove(&delivery.topic);
            } else {
                state.retained.insert(delivery.topic.clone(), delivery.clone());
            }
        }
        let Some(subscribers) = state.subscribers.get(&delivery.topic) else { return 0 };
        let mut queued = 0;
        for client in subscribers {
            let Some(handle) = state.clients.get(client) else { continue };
            match handle.deliveries.try_send(delivery.clone()) {
                Ok(()) => queued += 1,
                Err(_) => {
                    tracing::warn!(client, topic = %delivery.topic, "a client is not reading; message dropped")
                }
            }
        }
        queued
    }

    /// Client ids connected now.
    pub fn connected(&self) -> usize {
        self.lock().clients.len()
    }
}

impl DeviceLink for Router {
    fn publish(
        &self,
        device: &str,
        kind: TopicKind,
        payload: Bytes,
        retain: bool,
        correlation_data: Option<Bytes>,
    ) {
        let Some(topics) = DeviceTopics::new(device) else {
            tracing::warn!(device, "not publishing to an invalid device id");
            return;
        };
        Router::publish(self, Delivery { topic: topics.topic(kind), payload, retain, correlation_data });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(connection: u64) -> (ClientHandle, mpsc::Receiver<Delivery>) {
        let (deliveries, received) = mpsc::channel(8);
        (ClientHandle { connection, deliveries, taken_over: CancellationToken::new() }, received)
    }

    fn delivery(topic: &str, payload: &'static [u8], retain: bool) -> Delivery {
        Delivery { topic: topic.into(), payload: Bytes::from_static(payload), retain, correlation_data: None }
    }

    #[test]
    fn subscribers_get_messages_and_late_subscribers_the_retained_one() {
        let router = Router::default();
        let (a, mut a_rx) = handle(1);
        router.register("a", a);
        assert_eq!(router.subscribe("a", "t"), None);
        assert_eq!(router.publish(delivery("t", b"1", true)), 1);
        assert_eq!(a_rx.try_recv().unwrap().payload, Bytes::from_static(b"1"));
        let (b, _b_rx) = handle(2);
        router.register("b", b);
        assert_eq!(router.subscribe("b", "t").unwrap().payload, Bytes::from_static(b"1"));
        router.publish(delivery("t", b"", true));
        let (c, _c_rx) = handle(3);
        router.register("c", c);
        assert_eq!(router.subscribe("c", "t"), None, "an empty retained payload clears it");
    }

    #[test]
    fn a_second_connection_takes_the_client_id_over() {
        let router = Router::default();
        let (old, _old_rx) = handle(1);
        let old_token = old.taken_over.clone();
        router.register("a", old);
        router.subscribe("a", "t");
        let (new, mut new_rx) = handle(2);
        router.register("a", new);
        assert!(old_token.is_cancelled());
        router.unregister("a", 1);
        assert_eq!(router.connected(), 1, "the old connection's exit does not remove the new one");
        assert_eq!(router.publish(delivery("t", b"x", false)), 0, "subscriptions do not carry over");
        router.subscribe("a", "t");
        router.publish(delivery("t", b"x", false));
        assert!(new_rx.try_recv().is_ok());
    }
}
