//! `DisconnectGuard`: cancels a generation when the client goes away. Axum drops a handler's future
//! (or a streaming body) when the connection closes; dropping the still-armed guard triggers the
//! request's `CancelToken` so the engine stops generating for nobody.

use std::time::Instant;

use super::events::ClientDisconnected;
use super::state::ApiState;
use crate::engine::CancelToken;

/// Triggers `cancel` when dropped before [`DisconnectGuard::disarm`].
pub struct DisconnectGuard {
    state: ApiState,
    id: String,
    cancel: CancelToken,
    stream: bool,
    started: Instant,
    armed: bool,
}

impl DisconnectGuard {
    /// Guards request `id`, which started at `started`.
    pub fn new(state: ApiState, id: String, cancel: CancelToken, stream: bool, started: Instant) -> Self {
        Self { state, id, cancel, stream, started, armed: true }
    }

    /// The request ended with a response; dropping no longer cancels.
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// Cancels the generation now (for example on timeout); dropping then does nothing more.
    pub fn cancel_now(&mut self) {
        self.cancel.cancel();
        self.armed = false;
    }
}

impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        if self.armed {
            self.cancel.cancel();
            ClientDisconnected { id: &self.id, stream: self.stream, elapsed: self.started.elapsed() }
                .emit(self.state.metrics());
        }
    }
}
