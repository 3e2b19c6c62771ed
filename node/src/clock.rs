//! The wall clock, read in one place. Protocol code takes time as a parameter (so the
//! simulator can drive it); the CLI driver reads it here.

/// Nanoseconds since the Unix epoch (0 if the clock is before it).
#[must_use]
#[allow(clippy::disallowed_methods)] // The one sanctioned read of the system clock.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX)
        })
}
