//! How long a message whose outcome keeps meeting an expected-version conflict is decided again,
//! and the pause between two tries.

use std::time::Duration;

/// How long an outcome is decided again on fresh state while its commits keep meeting an
/// expected-version conflict, before the message is parked as undecidable. Time, not a count:
/// on a replicated namespace a replica catching up after a fail-over can serve the same stale
/// stream for seconds, and a count of quick retries parked good messages then.
pub(super) const CONFLICT_PATIENCE: Duration = Duration::from_secs(30);
/// The longest pause between two decisions of one message that conflicted.
const CONFLICT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// The pause before deciding a message again after its `conflicts`-th conflict in a row: none
/// after the first, then 10 ms doubling up to `CONFLICT_PAUSE_MAX`.
pub(super) fn conflict_pause(conflicts: u32) -> Duration {
    match conflicts {
        0 => Duration::ZERO,
        n => Duration::from_millis(10)
            .saturating_mul(2u32.saturating_pow((n - 1).min(16)))
            .min(CONFLICT_PAUSE_MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conflict_is_decided_again_at_once_then_with_a_growing_pause() {
        let pauses: Vec<u64> = (0..10)
            .map(|n| conflict_pause(n).as_millis() as u64)
            .collect();
        assert_eq!(pauses, [0, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(conflict_pause(u32::MAX), CONFLICT_PAUSE_MAX);
    }
}
