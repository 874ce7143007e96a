//! Sharing a consumer's partitions between instances of a service on a shared store: each
//! instance announces itself with heartbeats and keeps its share of the partitions' leases,
//! sticky and without a leader. The consumer reads only what this instance owns (see
//! `consumer`); the store's fence refuses what it decided under a lease it lost.
//!
//! Assignment: from the sorted list of live members, each computes its quota (`P / n`, the first
//! `P mod n` one more). It keeps the partitions it holds up to its quota, releases the rest, and
//! takes free ones (no owner, or an owner no longer alive) up to its quota. Only the partitions
//! that must move do: a joining instance takes about `P / n`, a leaving one's are taken by the
//! others. Liveness is judged by this process's monotonic clock alone: a member is alive while
//! its heartbeat's revision changed within the lease time less two rounds (`silence_allowed`),
//! so two machines' clocks are never compared, and no wall clock is read.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::store::{
    ConsumerId, GroupSpec, GroupState, Lease, Member, MessageStore, StoreError, now_ms,
};

/// What a consumer may read and advance right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owned {
    /// Every partition: one process owns the store, there are no leases.
    All,
    /// These partitions, each with the epoch of the lease this instance holds.
    Leased(BTreeMap<u32, u64>),
}

impl Owned {
    /// The epoch under which this instance holds `partition`, if it does.
    pub(crate) fn epoch(&self, partition: u32) -> Option<u64> {
        match self {
            Self::All => Some(0),
            Self::Leased(leases) => leases.get(&partition).copied(),
        }
    }
}

/// One instance's part in a consumer group: heartbeats, and the leases it keeps.
pub(super) struct Assigner {
    pub(super) store: Arc<dyn MessageStore>,
    pub(super) consumer: ConsumerId,
    pub(super) spec: GroupSpec,
    pub(super) instance: Arc<str>,
    pub(super) ttl: Duration,
    pub(super) owned: watch::Sender<Owned>,
}

/// How long a round goes on from the leases it read, while the live members are the same and
/// this instance holds its share: the leases change only when an instance takes or gives up a
/// partition, which follows a change of members. Read every round, 32 leases four times a second
/// per consumer were most of what an idle instance cost the server. A lease taken from this
/// instance meanwhile (it was paused past its lease) is seen by then; the fence refuses what it
/// commits under it before that.
const LEASES_FRESH_FOR: Duration = Duration::from_secs(1);

/// The leases as a round last read them, with the live members it saw then.
struct KnownLeases {
    leases: Vec<Lease>,
    alive: Vec<String>,
    read: Instant,
}

/// The last heartbeat revision seen of each member, and when (by this process's clock).
#[derive(Default)]
struct Liveness(HashMap<String, (u64, Instant)>);

impl Liveness {
    /// The members alive now (sorted; `me` always among them), and those judged dead.
    ///
    /// A member is dead once its heartbeat has not changed for `silence` on this process's
    /// monotonic clock. One seen for the first time counts as just heard from, whatever time its
    /// heartbeat carries: a process that died without leaving has its partitions freed
    /// `silence` after it is first seen, and a live one on a machine whose clock is off is never
    /// judged dead for it (the time in the record was once compared, and a clock 10 s off made a
    /// live member lose its leases to every instance that started).
    fn judge(
        &mut self,
        members: &[Member],
        me: &str,
        silence: Duration,
    ) -> (Vec<String>, Vec<Member>) {
        let now = Instant::now();
        for member in members {
            let seen = self
                .0
                .entry(member.instance.clone())
                .or_insert_with(|| (member.revision, now));
            if seen.0 != member.revision {
                *seen = (member.revision, now);
            }
        }
        let listed: HashSet<&str> = members.iter().map(|m| m.instance.as_str()).collect();
        self.0
            .retain(|instance, _| listed.contains(instance.as_str()));
        let is_alive = |instance: &str| {
            instance == me
                || self
                    .0
                    .get(instance)
                    .is_some_and(|(_, at)| now.duration_since(*at) < silence)
        };
        let mut alive: Vec<String> = self.0.keys().filter(|i| is_alive(i)).cloned().collect();
        if !alive.iter().any(|i| i == me) {
            alive.push(me.to_owned());
        }
        alive.sort();
        let dead = members
            .iter()
            .filter(|m| !is_alive(&m.instance))
            .cloned()
            .collect();
        (alive, dead)
    }
}

/// The partitions the member at `index` of `members` (sorted) should hold: an equal share, the
/// first `partitions mod members` one more.
fn quota(partitions: usize, members: usize, index: usize) -> usize {
    let members = members.max(1);
    partitions / members + usize::from(index < partitions % members)
}

/// The leases free to take (no owner, or one not alive), starting where the share of the member
/// at `index` would begin, so that newcomers do not all race for the same ones.
fn free<'a>(leases: &'a [Lease], alive: &[String], index: usize) -> Vec<&'a Lease> {
    let partitions = leases.len();
    let start = index * partitions / alive.len().max(1);
    (0..partitions)
        .map(|offset| &leases[(start + offset) % partitions])
        .filter(|lease| match &lease.owner {
            None => true,
            Some(owner) => !alive.contains(owner),
        })
        .collect()
}

/// How often an instance looks at the members and leases: a twentieth of the lease time,
/// within 50-250 ms.
fn tick(ttl: Duration) -> Duration {
    (ttl / 20).clamp(Duration::from_millis(50), Duration::from_millis(250))
}

/// How long a member's heartbeat may stay unchanged before it is judged dead: the lease time
/// less two rounds, since a round sees a new heartbeat up to a round after it was written and
/// takes a dead member's partitions up to a round after it expired. So a killed instance's
/// share moves within the lease time of its last heartbeat (4.5 s of silence with the default
/// 5 s, four heartbeats missed). Judged by the whole lease time, takeovers measured from
/// `SIGKILL` took 4.8-5.5 s. Never under four heartbeats' worth, whatever the lease time.
fn silence_allowed(ttl: Duration) -> Duration {
    ttl.saturating_sub(tick(ttl) * 2).max(ttl * 4 / 5)
}

impl Assigner {
    fn tick(&self) -> Duration {
        tick(self.ttl)
    }

    /// Keeps this instance's share until `stopped` says the consumer has finished (its last
    /// commit is in), then releases every lease and leaves, so the others take over at once.
    pub(super) async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        let store = self.store.clone();
        let Some(leases) = store.leases() else {
            return;
        };
        // Leases are taken only on a group that exists, with the split it was created with.
        loop {
            match self.store.join_group(&self.consumer, self.spec).await {
                Ok(group) => {
                    self.spec = group.spec;
                    break;
                }
                Err(e) => {
                    tracing::warn!(consumer = %self.consumer, "joining the group failed: {e}")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.tick()) => {}
                _ = stopped.changed() => return,
            }
        }
        let started_ms = now_ms();
        let mut liveness = Liveness::default();
        let mut known = None;
        let mut last_heartbeat: Option<Instant> = None;
        loop {
            if *stopped.borrow() {
                break;
            }
            if last_heartbeat.is_none_or(|at| at.elapsed() >= self.ttl / 5) {
                match leases
                    .heartbeat(&self.consumer, &self.instance, started_ms)
                    .await
                {
                    Ok(()) => last_heartbeat = Some(Instant::now()),
                    Err(e) => tracing::warn!(consumer = %self.consumer, "heartbeat failed: {e}"),
                }
            }
            if let Err(e) = self.rebalance(&mut liveness, &mut known).await {
                tracing::warn!(consumer = %self.consumer, "rebalancing failed: {e}");
            }
            tokio::select! {
                () = tokio::time::sleep(self.tick()) => {}
                _ = stopped.changed() => {}
            }
        }
        // The consumer is done: nothing more is committed under these leases.
        let held = self.held().await.unwrap_or_default();
        self.owned.send_replace(Owned::Leased(BTreeMap::new()));
        for lease in held {
            if let Err(e) = leases.release(&self.consumer, &lease).await {
                tracing::debug!(consumer = %self.consumer, partition = lease.partition, "release: {e}");
            }
        }
        if let Err(e) = leases.leave(&self.consumer, &self.instance).await {
            tracing::warn!(consumer = %self.consumer, "leaving the group failed: {e}");
        }
    }

    async fn state(&self) -> Result<GroupState, StoreError> {
        match self.store.leases() {
            Some(leases) => leases.group_state(&self.consumer, &self.spec).await,
            None => Ok(GroupState::default()),
        }
    }

    async fn held(&self) -> Result<Vec<Lease>, StoreError> {
        let me = Some(self.instance.to_string());
        Ok(self
            .state()
            .await?
            .leases
            .into_iter()
            .filter(|lease| lease.owner == me)
            .collect())
    }

    /// One round: keep what is ours up to the quota, release the rest, take free partitions.
    async fn rebalance(
        &self,
        liveness: &mut Liveness,
        known: &mut Option<KnownLeases>,
    ) -> Result<(), StoreError> {
        let Some(leases) = self.store.leases() else {
            return Ok(());
        };
        let members = leases.members(&self.consumer).await?;
        let (alive, dead) = liveness.judge(&members, &self.instance, silence_allowed(self.ttl));
        for member in &dead {
            // Its leases are free either way; the record goes so listings show the living.
            match leases.forget(&self.consumer, member).await {
                Ok(()) => tracing::info!(
                    consumer = %self.consumer, instance = %member.instance,
                    "an instance stopped renewing its membership; its partitions are free"
                ),
                Err(StoreError::ConsumerMoved { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let index = alive.iter().position(|i| *i == *self.instance).unwrap_or(0);
        let partitions = self.spec.partitions.max(1) as usize;
        let quota = quota(partitions, alive.len(), index);
        let me = Some(self.instance.to_string());
        let holds = |leases: &[Lease]| leases.iter().filter(|l| l.owner == me).count();
        let still_known = known.take().filter(|known| {
            dead.is_empty()
                && known.alive == alive
                && known.read.elapsed() < LEASES_FRESH_FOR
                && holds(&known.leases) == quota
        });
        let read = match still_known {
            Some(known) => known,
            None => KnownLeases {
                leases: leases.partition_leases(&self.consumer, &self.spec).await?,
                alive: alive.clone(),
                read: Instant::now(),
            },
        };
        let mut mine: BTreeMap<u32, Lease> = read
            .leases
            .iter()
            .filter(|lease| lease.owner == me)
            .map(|lease| (lease.partition, lease.clone()))
            .collect();
        // Over quota: stop reading the extras first, then give them up.
        while mine.len() > quota {
            let Some((_, lease)) = mine.pop_last() else {
                break;
            };
            self.publish(&mine);
            if let Err(e) = leases.release(&self.consumer, &lease).await {
                tracing::debug!(consumer = %self.consumer, partition = lease.partition, "release: {e}");
            }
        }
        if mine.len() < quota {
            // Start looking where this member's share would begin, so that newcomers do not
            // all race for the same free partitions.
            let wanted: Vec<Lease> = free(&read.leases, &alive, index)
                .into_iter()
                .take(quota - mine.len())
                .cloned()
                .collect();
            // All at once (one write); when one of them was taken first, one by one.
            let taken = match leases.take(&self.consumer, &self.instance, &wanted).await {
                Ok(taken) => taken,
                Err(StoreError::ConsumerMoved { .. }) => {
                    let mut taken = Vec::new();
                    for lease in &wanted {
                        match leases
                            .take(&self.consumer, &self.instance, std::slice::from_ref(lease))
                            .await
                        {
                            Ok(one) => taken.extend(one),
                            // Someone else took it first, or its position moved: next round.
                            Err(StoreError::ConsumerMoved { .. }) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    taken
                }
                Err(e) => return Err(e),
            };
            for lease in taken {
                tracing::debug!(
                    consumer = %self.consumer, partition = lease.partition,
                    epoch = lease.epoch, "took a partition"
                );
                mine.insert(lease.partition, lease);
            }
        }
        // What this round changed is read again next round.
        if holds(&read.leases) == mine.len() && mine.len() == quota {
            *known = Some(read);
        }
        self.publish(&mine);
        Ok(())
    }

    fn publish(&self, mine: &BTreeMap<u32, Lease>) {
        let owned = Owned::Leased(mine.iter().map(|(p, lease)| (*p, lease.epoch)).collect());
        self.owned.send_if_modified(|current| {
            let changed = *current != owned;
            *current = owned;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_member_is_dead_two_rounds_before_its_lease_runs_out() {
        let ms = Duration::from_millis;
        // Rounds of 250 ms: the share moves within the lease time of the last heartbeat.
        assert_eq!(silence_allowed(ms(5000)), ms(4500));
        assert_eq!(silence_allowed(ms(2000)), ms(1800));
        // Rounds of 50 ms at the shortest lease; never under four heartbeats (ttl / 5 each).
        assert_eq!(silence_allowed(ms(500)), ms(400));
        assert_eq!(silence_allowed(ms(100)), ms(80));
    }

    fn member(instance: &str, revision: u64, heartbeat_ms: u64) -> Member {
        Member {
            instance: instance.into(),
            revision,
            started_ms: 0,
            heartbeat_ms,
        }
    }

    fn lease(partition: u32, owner: Option<&str>) -> Lease {
        Lease {
            partition,
            owner: owner.map(str::to_owned),
            epoch: 1,
            changed_ms: 0,
            revision: 0,
        }
    }

    #[test]
    fn quotas_share_every_partition_evenly() {
        for members in 1..=9 {
            let quotas: Vec<usize> = (0..members).map(|i| quota(32, members, i)).collect();
            assert_eq!(quotas.iter().sum::<usize>(), 32, "{members} members");
            let (low, high) = (quotas.iter().min(), quotas.iter().max());
            assert!(high.zip(low).is_some_and(|(h, l)| h - l <= 1), "{quotas:?}");
        }
    }

    #[test]
    fn a_dead_members_leases_are_free_and_a_live_ones_are_not() {
        let leases = [
            lease(0, Some("alive")),
            lease(1, Some("dead")),
            lease(2, None),
            lease(3, Some("alive")),
        ];
        let alive = vec!["alive".to_owned(), "me".to_owned()];
        let partitions: Vec<u32> = free(&leases, &alive, 1)
            .iter()
            .map(|l| l.partition)
            .collect();
        // The second of two members starts looking half-way.
        assert_eq!(partitions, [2, 1]);
    }

    #[test]
    fn a_member_is_alive_while_its_heartbeat_changes() {
        let ttl = Duration::from_millis(100);
        let mut liveness = Liveness::default();
        let state = |revision| {
            vec![
                member("other", revision, now_ms()),
                member("me", 1, now_ms()),
            ]
        };
        let (alive, dead) = liveness.judge(&state(1), "me", ttl);
        assert_eq!(alive, ["me", "other"]);
        assert!(dead.is_empty());
        std::thread::sleep(ttl + Duration::from_millis(20));
        let (alive, _) = liveness.judge(&state(2), "me", ttl);
        assert_eq!(alive, ["me", "other"], "a new revision: alive");
        std::thread::sleep(ttl + Duration::from_millis(20));
        let (alive, dead) = liveness.judge(&state(2), "me", ttl);
        assert_eq!(alive, ["me"], "no heartbeat for the lease time: dead");
        assert_eq!(dead.len(), 1);
    }

    #[test]
    fn a_member_is_judged_by_this_clock_never_by_the_time_its_heartbeat_carries() {
        let ttl = Duration::from_millis(200);
        let mut liveness = Liveness::default();
        // Clocks 10 s behind, 10 s ahead, a minute behind: all heard from now.
        let state = |revision| {
            [
                member("behind", revision, now_ms().saturating_sub(10_000)),
                member("ahead", revision, now_ms() + 10_000),
                member("silent", 7, now_ms().saturating_sub(60_000)),
            ]
        };
        let (alive, dead) = liveness.judge(&state(1), "me", ttl);
        assert_eq!(alive, ["ahead", "behind", "me", "silent"]);
        assert!(dead.is_empty());
        // Only a revision that stops changing makes a member dead.
        std::thread::sleep(ttl + Duration::from_millis(20));
        let (alive, dead) = liveness.judge(&state(2), "me", ttl);
        assert_eq!(alive, ["ahead", "behind", "me"]);
        assert_eq!(
            dead.iter().map(|m| m.instance.as_str()).collect::<Vec<_>>(),
            ["silent"]
        );
    }
}
