//! Limits against abuse, so that a slow or greedy client slows no one else: writes per client
//! per second (`governor`, keyed by the client's address), WebSocket connections in all and per
//! client, follows per connection, and how long a request may take.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// The gateway's limits; [`Default`] is what `ferry run` uses unless told otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSettings {
    /// Writes (commands, replays, webhook calls) one client address may make per second, as a
    /// steady rate; the operator is not limited.
    pub writes_per_second: u32,
    /// Writes a client may make at once before the steady rate applies.
    pub write_burst: u32,
    /// Open WebSocket connections in all.
    pub connections: usize,
    /// Open WebSocket connections of one client address.
    pub connections_per_client: usize,
    /// Streams one WebSocket connection may follow.
    pub follows_per_connection: usize,
    /// Longest time a request (not a WebSocket) may take, body included.
    pub request_timeout: Duration,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            writes_per_second: 20,
            write_burst: 40,
            connections: 1024,
            connections_per_client: 16,
            follows_per_connection: 16,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Writes between two sweeps of idle clients' entries.
const FORGET_EVERY: u64 = 4096;

/// The limits' state, shared by every request.
pub struct Limiter {
    pub settings: LimitSettings,
    writes: DefaultKeyedRateLimiter<IpAddr>,
    /// Writes counted, to forget idle clients every so often.
    counted: AtomicU64,
    connections: Mutex<HashMap<IpAddr, usize>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A write refused by the rate limit: try again after this long.
#[derive(Debug, Clone, Copy)]
pub struct SlowDown(pub Duration);

/// An open WebSocket connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct ConnectionPass {
    limiter: Arc<Limiter>,
    client: IpAddr,
}

impl Drop for ConnectionPass {
    fn drop(&mut self) {
        if let Ok(mut open) = self.limiter.connections.lock()
            && let Some(count) = open.get_mut(&self.client)
        {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.client);
            }
        }
    }
}

impl Limiter {
    pub fn new(settings: LimitSettings) -> Self {
        let rate = NonZeroU32::new(settings.writes_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(settings.write_burst).unwrap_or(rate);
        Self {
            settings,
            writes: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            counted: AtomicU64::new(0),
            connections: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one write of `client`'s allowance.
    pub fn write(&self, client: IpAddr) -> Result<(), SlowDown> {
        if self.counted.fetch_add(1, Ordering::Relaxed) % FORGET_EVERY == FORGET_EVERY - 1 {
            self.forget_idle_clients();
        }
        match self.writes.check_key(&client) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                Err(SlowDown(wait))
            }
        }
    }

    /// Forgets clients whose allowance is full again, so that the table does not grow with
    /// every address ever seen.
    fn forget_idle_clients(&self) {
        self.writes.retain_recent();
        self.writes.shrink_to_fit();
    }

    /// A place for one more WebSocket connection of `client`, if there is one.
    pub fn connect(self: &Arc<Self>, client: IpAddr) -> Option<ConnectionPass> {
        let mut open = self.connections.lock().ok()?;
        let total: usize = open.values().sum();
        let own = open.get(&client).copied().unwrap_or(0);
        if total >= self.settings.connections || own >= self.settings.connections_per_client {
            return None;
        }
        open.insert(client, own + 1);
        Some(ConnectionPass {
            limiter: self.clone(),
            client,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_past_its_burst_waits_and_others_do_not() {
        let limiter = Limiter::new(LimitSettings {
            writes_per_second: 1,
            write_burst: 3,
            ..LimitSettings::default()
        });
        let greedy: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        for _ in 0..3 {
            assert!(limiter.write(greedy).is_ok());
        }
        let refused = limiter.write(greedy).expect_err("past the burst");
        assert!(refused.0 > Duration::ZERO && refused.0 <= Duration::from_secs(1));
        assert!(limiter.write(other).is_ok());
    }

    #[test]
    fn connections_are_capped_in_all_and_per_client() {
        let limiter = Arc::new(Limiter::new(LimitSettings {
            connections: 3,
            connections_per_client: 2,
            ..LimitSettings::default()
        }));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = limiter.connect(a).expect("first");
        let _second = limiter.connect(a).expect("second");
        assert!(limiter.connect(a).is_none(), "a third of one client");
        let _third = limiter.connect(b).expect("another client");
        assert!(limiter.connect(b).is_none(), "the fourth in all");
        drop(first);
        assert!(limiter.connect(a).is_some(), "a place freed");
    }
}
