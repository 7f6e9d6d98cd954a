//! The peer's notion of "now".
//!
//! The state machines take `now` as a `std::time::Instant`; the runtime reads it from
//! tokio's clock so that a simulation (turmoil) or a paused test clock drives timeouts
//! exactly as it drives timers.

/// Wall-clock milliseconds since the Unix epoch (0 before it): publish times and the
/// outbox's message ages. Read once per publish and passed along, not re-read.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The current instant of tokio's clock.
pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
