//! The peer's notion of "now".
//!
//! The state machines take `now` as a `std::time::Instant`; the runtime reads it from
//! tokio's clock so that a simulation (turmoil) or a paused test clock drives timeouts
//! exactly as it drives timers.

/// The current instant of tokio's clock.
pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
