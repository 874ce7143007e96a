//! Limits against abuse, so that a slow or greedy client slows no one else: writes per client
//! per second (`governor`, keyed by the client's address; an IPv6 client by its /64, which one
//! machine usually holds whole), failed authentications counted as writes (a client past its
//! allowance gets nothing but 429 until it has waited), anonymous writes in all, the body of an
//! anonymous request, WebSocket connections in all and per client, follows per connection, and
//! how long a request may take.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::DefaultClock;
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
    /// Writes per second of every anonymous client together (each is also held to its own).
    pub anonymous_writes_per_second: u32,
    /// Largest body of a request that carries no credential.
    pub anonymous_body_bytes: usize,
    /// Largest WebSocket message (and frame) a client may send: a follow or a token.
    pub websocket_message_bytes: usize,
    /// A WebSocket peer that answers nothing (not even the pings sent a third of this apart)
    /// for this long is dropped.
    pub websocket_idle: Duration,
    /// How long a WebSocket opened without a credential, where anonymous clients may follow
    /// nothing, has to present a token.
    pub websocket_sign_in: Duration,
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
            anonymous_writes_per_second: 50,
            anonymous_body_bytes: 16 * 1024,
            websocket_message_bytes: 16 * 1024,
            websocket_idle: Duration::from_secs(60),
            websocket_sign_in: Duration::from_secs(10),
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
    anonymous: governor::DefaultDirectRateLimiter,
    /// Clients that failed to authenticate past their allowance, until when they get only 429.
    blocked: Mutex<HashMap<IpAddr, std::time::Instant>>,
}

/// Whom a limit counts: an IPv4 address, or an IPv6 address's /64 (a machine or a home
/// network gets a whole /64, and choosing a new address in it is free).
pub fn client_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(bits))
            }
        },
        v4 => v4,
    }
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
        let anonymous =
            NonZeroU32::new(settings.anonymous_writes_per_second).unwrap_or(NonZeroU32::MIN);
        Self {
            settings,
            writes: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            counted: AtomicU64::new(0),
            connections: Mutex::new(HashMap::new()),
            anonymous: RateLimiter::direct(Quota::per_second(anonymous)),
            blocked: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one write of `client`'s allowance.
    pub fn write(&self, client: IpAddr) -> Result<(), SlowDown> {
        if self.counted.fetch_add(1, Ordering::Relaxed) % FORGET_EVERY == FORGET_EVERY - 1 {
            self.forget_idle_clients();
        }
        self.writes
            .check_key(&client_key(client))
            .map_err(|not_until| SlowDown(wait_from(&not_until)))
    }

    /// Takes one anonymous write: the client's allowance, and one of all anonymous clients'.
    pub fn anonymous_write(&self, client: IpAddr) -> Result<(), SlowDown> {
        self.write(client)?;
        self.anonymous
            .check()
            .map_err(|not_until| SlowDown(wait_from(&not_until)))
    }

    /// Counts a failed authentication as a write of `client`'s; past its allowance the client
    /// is answered 429 without its credential being looked at until it has waited.
    pub fn failed_authentication(&self, client: IpAddr) {
        if let Err(SlowDown(wait)) = self.write(client)
            && let Ok(mut blocked) = self.blocked.lock()
        {
            blocked.insert(client_key(client), std::time::Instant::now() + wait);
        }
    }

    /// How long `client` must still wait after failing to authenticate too often.
    pub fn blocked(&self, client: IpAddr) -> Option<Duration> {
        let mut blocked = self.blocked.lock().ok()?;
        let key = client_key(client);
        let until = *blocked.get(&key)?;
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            blocked.remove(&key);
            return None;
        }
        Some(left)
    }

    /// Forgets clients whose allowance is full again, so that the table does not grow with
    /// every address ever seen.
    fn forget_idle_clients(&self) {
        self.writes.retain_recent();
        self.writes.shrink_to_fit();
    }

    /// A place for one more WebSocket connection of `client`, if there is one.
    pub fn connect(self: &Arc<Self>, client: IpAddr) -> Option<ConnectionPass> {
        let client = client_key(client);
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

/// How long from now until `not_until` lets a request through.
fn wait_from(
    not_until: &governor::NotUntil<<DefaultClock as governor::clock::Clock>::Instant>,
) -> Duration {
    not_until.wait_time_from(governor::clock::Clock::now(&DefaultClock::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_client_is_counted_by_its_slash_64() {
        let limiter = Limiter::new(LimitSettings {
            writes_per_second: 1,
            write_burst: 2,
            ..LimitSettings::default()
        });
        let first: IpAddr = "2001:db8:1:2::1".parse().expect("address");
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("address");
        let other_64: IpAddr = "2001:db8:1:3::1".parse().expect("address");
        assert!(limiter.write(first).is_ok());
        assert!(limiter.write(same_64).is_ok());
        assert!(
            limiter.write(same_64).is_err(),
            "one allowance for the whole /64"
        );
        assert!(limiter.write(other_64).is_ok());
    }

    #[test]
    fn a_client_failing_to_authenticate_past_its_allowance_is_held_off() {
        let limiter = Limiter::new(LimitSettings {
            writes_per_second: 1,
            write_burst: 2,
            ..LimitSettings::default()
        });
        let guesser: IpAddr = [10, 0, 0, 7].into();
        for _ in 0..2 {
            limiter.failed_authentication(guesser);
            assert!(limiter.blocked(guesser).is_none(), "within its allowance");
        }
        limiter.failed_authentication(guesser);
        assert!(limiter.blocked(guesser).is_some(), "past it");
        assert!(limiter.blocked([10, 0, 0, 8].into()).is_none());
    }

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
