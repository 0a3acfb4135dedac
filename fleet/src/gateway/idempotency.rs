//! Answers remembered by `(device, request_id)` for a while, so that a device repeating a request
//! (the id is its idempotency key) is answered from the record instead of calling upstream again.
//! A request still being answered is joined rather than started twice. Retryable errors are not
//! remembered: a retry of those must reach upstream.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tandem_core::protocol::OffloadResponse;
use uuid::Uuid;

type Key = (String, Uuid);

/// What the record says about a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// Never seen (or forgotten): answer it; it is now marked in flight.
    New,
    /// Being answered now.
    InFlight,
    /// Answered before: this is the answer.
    Answered(OffloadResponse),
}

#[derive(Debug)]
enum Entry {
    InFlight,
    Answered(OffloadResponse),
}

/// The record.
#[derive(Debug)]
pub struct IdempotencyRecord {
    ttl: Duration,
    capacity: usize,
    entries: HashMap<Key, (Entry, Instant)>,
    expiry: VecDeque<(Instant, Key)>,
}

impl IdempotencyRecord {
    /// Remembers answers for `ttl`, at most `capacity` of them (oldest forgotten first).
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self { ttl, capacity, entries: HashMap::new(), expiry: VecDeque::new() }
    }

    /// Looks `request_id` of `device` up at `now`, marking a new one in flight.
    pub fn check(&mut self, device: &str, request_id: Uuid, now: Instant) -> Seen {
        self.expire(now);
        let key = (device.to_string(), request_id);
        match self.entries.get(&key) {
            Some((Entry::InFlight, _)) => Seen::InFlight,
            Some((Entry::Answered(response), _)) => Seen::Answered(response.clone()),
            None => {
                self.insert(key, Entry::InFlight, now);
                Seen::New
            }
        }
    }

    /// Records the answer; `remember: false` (a retryable failure) forgets the request instead.
    pub fn finish(&mut self, device: &str, response: &OffloadResponse, remember: bool, now: Instant) {
        let key = (device.to_string(), response.request_id);
        if remember {
            self.insert(key, Entry::Answered(response.clone()), now);
        } else {
            self.entries.remove(&key);
        }
    }

    fn insert(&mut self, key: Key, entry: Entry, now: Instant) {
        let expires = now + self.ttl;
        self.entries.insert(key.clone(), (entry, expires));
        self.expiry.push_back((expires, key));
        while self.entries.len() > self.capacity {
            let Some((expires, oldest)) = self.expiry.pop_front() else { break };
            if self.entries.get(&oldest).is_some_and(|(_, at)| *at == expires) {
                self.entries.remove(&oldest);
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((expires, _)) = self.expiry.front() {
            if *expires > now {
                break;
            }
            let (expires, key) = self.expiry.pop_front().expect("front exists");
            // Only the latest insert of a key decides when it expires.
            if self.entries.get(&key).is_some_and(|(_, at)| *at == expires) {
                self.entries.remove(&key);
            }
        }
    }

    /// Requests remembered now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use tandem_core::protocol::{OffloadOutcome, PROTOCOL_VERSION};

    use super::*;

    fn answer(request_id: Uuid) -> OffloadResponse {
        OffloadResponse {
            v: PROTOCOL_VERSION,
            request_id,
            outcome: OffloadOutcome::Refused { reason: "cap".into() },
        }
    }

    #[test]
    fn a_repeated_request_is_joined_then_answered_from_the_record_until_it_expires() {
        let mut record = IdempotencyRecord::new(Duration::from_secs(10), 100);
        let (id, t0) = (Uuid::now_v7(), Instant::now());
        assert_eq!(record.check("a", id, t0), Seen::New);
        assert_eq!(record.check("a", id, t0), Seen::InFlight);
        assert_eq!(record.check("b", id, t0), Seen::New, "scoped by device");
        record.finish("a", &answer(id), true, t0);
        assert_eq!(record.check("a", id, t0 + Duration::from_secs(5)), Seen::Answered(answer(id)));
        assert_eq!(record.check("a", id, t0 + Duration::from_secs(11)), Seen::New);
    }

    #[test]
    fn retryable_failures_are_forgotten() {
        let mut record = IdempotencyRecord::new(Duration::from_secs(10), 100);
        let (id, t0) = (Uuid::now_v7(), Instant::now());
        assert_eq!(record.check("a", id, t0), Seen::New);
        record.finish("a", &answer(id), false, t0);
        assert_eq!(record.check("a", id, t0), Seen::New);
    }

    #[test]
    fn the_record_is_bounded() {
        let mut record = IdempotencyRecord::new(Duration::from_secs(10), 3);
        let t0 = Instant::now();
        let ids: Vec<_> = (0..5).map(|_| Uuid::now_v7()).collect();
        for id in &ids {
            record.check("a", *id, t0);
        }
        assert_eq!(record.len(), 3);
        assert_eq!(record.check("a", ids[4], t0), Seen::InFlight);
    }
}
