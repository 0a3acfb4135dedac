//! Which publish a PUBACK acknowledges.
//!
//! rumqttc chooses packet ids inside its event loop and does not return them to the publisher
//! (bytebeamio/rumqtt#349, #1007). What it does guarantee: requests leave its channel in the order
//! they were queued, and each QoS 1 publish it takes from the channel yields exactly one
//! `Outgoing::Publish(pkid)` (or `Outgoing::AwaitAck(pkid)` when that id is still in flight, followed
//! by `Outgoing::Publish(pkid)` once it is free). So the link queues a waiter in the same critical
//! section as the publish, binds the oldest queued waiter to the packet id when the publish goes out,
//! and resolves it when the PUBACK with that id arrives.
//!
//! Retransmissions would break this order, so on every disconnect the link drops everything unsent
//! or unacknowledged from rumqttc and fails every waiter here ([`PubAckTracker::drain`]); callers
//! keep their data and publish it again. No sockets here: the event-loop task feeds it.

use std::collections::{HashMap, VecDeque};

/// Publishes between "queued" and "acknowledged", with a waiter `W` each (`None`: nobody waits).
#[derive(Debug)]
pub(crate) struct PubAckTracker<W> {
    /// Handed to rumqttc, packet id not yet known; oldest first.
    queued: VecDeque<Option<W>>,
    /// Taken from the queue while its packet id was still in flight (`Outgoing::AwaitAck`).
    colliding: Option<Option<W>>,
    /// Sent with this packet id, waiting for the PUBACK.
    in_flight: HashMap<u16, Option<W>>,
}

impl<W> Default for PubAckTracker<W> {
    fn default() -> Self {
        Self { queued: VecDeque::new(), colliding: None, in_flight: HashMap::new() }
    }
}

impl<W> PubAckTracker<W> {
    /// A QoS 1 publish was queued in rumqttc's request channel.
    pub fn queued(&mut self, waiter: Option<W>) {
        self.queued.push_back(waiter);
    }

    /// rumqttc sent a publish with `pkid` (`Outgoing::Publish`). Returns `false` when no queued
    /// publish explains it (which would mean rumqttc retransmitted something).
    pub fn sent(&mut self, pkid: u16) -> bool {
        let waiter = match self.colliding.take() {
            Some(waiter) => waiter,
            None => match self.queued.pop_front() {
                Some(waiter) => waiter,
                None => return false,
            },
        };
        // rumqttc reuses only acknowledged ids, so nothing is replaced here; were a waiter replaced,
        // dropping it tells its publisher that the publish was lost.
        drop(self.in_flight.insert(pkid, waiter));
        true
    }

    /// rumqttc held a publish back because `pkid` is still in flight (`Outgoing::AwaitAck`).
    pub fn collided(&mut self, _pkid: u16) {
        if self.colliding.is_none() {
            self.colliding = Some(self.queued.pop_front().flatten());
        }
    }

    /// The broker acknowledged `pkid`: the waiter to resolve, if anyone waits.
    pub fn acknowledged(&mut self, pkid: u16) -> Option<W> {
        self.in_flight.remove(&pkid).flatten()
    }

    /// The connection dropped: every waiter, to be failed. The tracker is empty afterwards.
    pub fn drain(&mut self) -> Vec<W> {
        let queued = self.queued.drain(..);
        let colliding = self.colliding.take();
        let in_flight = self.in_flight.drain().map(|(_, w)| w);
        queued.chain(colliding).chain(in_flight).flatten().collect()
    }

    /// Publishes not yet acknowledged.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queued.len() + usize::from(self.colliding.is_some()) + self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_resolve_the_publish_that_was_sent_with_their_packet_id() {
        let mut t = PubAckTracker::default();
        t.queued(Some("a"));
        t.queued(None);
        t.queued(Some("c"));
        assert!(t.sent(1) && t.sent(2) && t.sent(3));
        assert_eq!(t.acknowledged(3), Some("c"));
        assert_eq!(t.acknowledged(2), None);
        assert_eq!(t.acknowledged(1), Some("a"));
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn packet_ids_are_reused_after_their_ack() {
        let mut t = PubAckTracker::default();
        t.queued(Some(1));
        t.sent(7);
        assert_eq!(t.acknowledged(7), Some(1));
        t.queued(Some(2));
        t.sent(7);
        assert_eq!(t.acknowledged(7), Some(2));
        assert_eq!(t.acknowledged(7), None, "a duplicate ack resolves nothing");
    }

    #[test]
    fn a_colliding_publish_is_bound_when_rumqttc_finally_sends_it() {
        let mut t = PubAckTracker::default();
        t.queued(Some("old"));
        t.sent(1);
        t.queued(Some("new"));
        t.queued(Some("later"));
        t.collided(1);
        assert_eq!(t.acknowledged(1), Some("old"));
        assert!(t.sent(1), "rumqttc now sends the held-back publish with id 1");
        assert_eq!(t.acknowledged(1), Some("new"));
        assert!(t.sent(2));
        assert_eq!(t.acknowledged(2), Some("later"));
    }

    #[test]
    fn an_unexplained_send_is_reported() {
        let mut t: PubAckTracker<()> = PubAckTracker::default();
        assert!(!t.sent(4));
    }

    #[test]
    fn a_disconnect_fails_every_waiter_wherever_it_is() {
        let mut t = PubAckTracker::default();
        t.queued(Some("in flight"));
        t.sent(1);
        t.queued(Some("colliding"));
        t.collided(1);
        t.queued(Some("queued"));
        t.queued(None);
        let mut failed = t.drain();
        failed.sort();
        assert_eq!(failed, ["colliding", "in flight", "queued"]);
        assert_eq!(t.len(), 0);
        assert!(!t.sent(1), "nothing is left to bind");
    }
}
