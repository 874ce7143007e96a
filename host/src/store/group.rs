//! Consumer groups: a consumer's category split into partitions by entity, each with its own
//! durable position, so that several instances of a service can share the category (each owning
//! some partitions) while one entity's messages stay in one partition, in order. Owns the
//! partition function, the types that cross the store for groups, the category read filter, and
//! the [`Leases`] a shared store offers for deciding who owns which partition.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ConsumerId, Message, StoreError};

/// Partitions of a new group. 32 spreads a category within one partition (±3%) over up to 8
/// instances, and bounds what one page's commit can advance to 32 position records.
pub const DEFAULT_PARTITIONS: u32 = 32;

/// Which entity a message belongs to for partitioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PartitionKey {
    /// The id of the message's stream (`user.42` → `42`; `user:command.42` → `42`).
    Entity,
    /// The id of the message's `originEntity` (a subscription filtered by origin): the entity
    /// that started the flow, whose events must stay in order for it.
    OriginEntity,
}

/// How a consumer's category is split; fixed when the group is created, since changing it would
/// move entities between partitions mid-stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpec {
    pub partitions: u32,
    pub key: PartitionKey,
}

impl GroupSpec {
    /// The split of a new consumer's group: [`DEFAULT_PARTITIONS`] by `key`.
    pub fn new(key: PartitionKey) -> Self {
        Self {
            partitions: DEFAULT_PARTITIONS,
            key,
        }
    }

    /// The partition a message of the category belongs to.
    pub fn partition_of(&self, message: &Message) -> u32 {
        let entity = match self.key {
            PartitionKey::Entity => message.stream.id(),
            PartitionKey::OriginEntity => message
                .origin_entity()
                .map(|origin| origin.split_once('.').map_or(origin, |(_, id)| id))
                .unwrap_or(""),
        };
        partition_of(entity, self.partitions)
    }
}

/// The partition of an entity id among `partitions`: the first 8 bytes of its SHA-256, modulo.
/// SHA-256 because its output never changes between versions of Ferry or Rust (the standard
/// hasher's may), and it is already a dependency; next to a guest call its cost is nothing.
pub fn partition_of(entity: &str, partitions: u32) -> u32 {
    let digest = Sha256::digest(entity.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % u64::from(partitions.max(1))) as u32
}

/// One partition's durable place: every message of the partition at or below `position` is
/// settled. `epoch` names the lease under which it was last taken over (0 where one process owns
/// the store); a commit decided under another epoch is refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionPosition {
    pub position: u64,
    pub epoch: u64,
}

/// A consumer group as stored: its split and one position per partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub spec: GroupSpec,
    pub positions: Vec<PartitionPosition>,
}

impl Group {
    /// The lowest position of any partition: every message of the category at or below it is
    /// settled.
    pub fn low(&self) -> u64 {
        self.positions.iter().map(|p| p.position).min().unwrap_or(0)
    }

    /// Every partition with where it stands: what a commit that moves the whole group names.
    pub fn every_partition(&self) -> Vec<PartitionFrom> {
        (0u32..)
            .zip(&self.positions)
            .map(|(partition, from)| PartitionFrom {
                partition,
                from: *from,
            })
            .collect()
    }
}

/// A partition a commit advances, with where the consumer read it from: the stored position
/// must still be exactly this (position and epoch), or the commit fails whole with
/// [`StoreError::ConsumerMoved`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionFrom {
    pub partition: u32,
    pub from: PartitionPosition,
}

/// What a category read keeps: messages whose `originEntity` starts with a prefix, and of owned
/// partitions past each one's position.
#[derive(Debug, Clone, Default)]
pub struct CategoryFilter {
    pub origin_prefix: Option<String>,
    pub partitions: Option<PartitionFilter>,
}

/// The partitions a reader owns, each with the position past which it reads.
#[derive(Debug, Clone)]
pub struct PartitionFilter {
    pub spec: GroupSpec,
    /// Per partition: `Some(position)` when owned.
    pub after: Vec<Option<u64>>,
}

impl CategoryFilter {
    /// Keeps only messages whose `originEntity` starts with `prefix`.
    pub fn origin(prefix: &str) -> Self {
        Self {
            origin_prefix: Some(prefix.to_owned()),
            partitions: None,
        }
    }

    /// How many messages a read should fetch to keep about `wanted`: by the share of
    /// partitions owned (a quarter more, for the hash's unevenness), or `None` when an
    /// `originEntity` filter makes the share unknowable.
    pub fn fetch_for(&self, wanted: usize) -> Option<usize> {
        if self.origin_prefix.is_some() {
            return None;
        }
        let Some(filter) = &self.partitions else {
            return Some(wanted);
        };
        let owned = filter.after.iter().filter(|a| a.is_some()).count().max(1);
        Some((wanted * filter.after.len()).div_ceil(owned) * 5 / 4 + 1)
    }

    pub fn keeps(&self, message: &Message) -> bool {
        let origin = self.origin_prefix.as_deref().is_none_or(|prefix| {
            message
                .origin_entity()
                .is_some_and(|o| o.starts_with(prefix))
        });
        origin
            && self.partitions.as_ref().is_none_or(|filter| {
                let partition = filter.spec.partition_of(message) as usize;
                filter
                    .after
                    .get(partition)
                    .copied()
                    .flatten()
                    .is_some_and(|after| message.global_position > after)
            })
    }
}

/// A live instance of a consumer group, as its heartbeats show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub instance: String,
    /// The store's revision of its last heartbeat: it changes with every heartbeat, so a reader
    /// judges liveness by its own clock (how long since it last saw this change), never by
    /// comparing clocks of two machines.
    pub revision: u64,
    /// When it joined, by its own clock (shown, not used).
    pub started_ms: u64,
    /// When it last renewed, by its own clock: shown, and used once, when a reader first sees
    /// the member (see `service::group`).
    pub heartbeat_ms: u64,
}

/// Who holds one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub partition: u32,
    /// `None`: released, or never taken.
    pub owner: Option<String>,
    /// Grows with every take-over; the partition's position carries it (the fence).
    pub epoch: u64,
    /// When it was last taken or released, by the writer's clock (shown, not used).
    pub changed_ms: u64,
    /// The store's revision of this lease, which a take or release must match.
    pub revision: u64,
}

/// A group's members and leases as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupState {
    pub members: Vec<Member>,
    /// One per partition, in order.
    pub leases: Vec<Lease>,
}

/// What a store shared by several processes offers for deciding who owns which partition of a
/// group: membership by heartbeat, and leases changed only by compare-and-set. A store that one
/// process owns (sled) has none: that process owns every partition.
#[async_trait]
pub trait Leases: Send + Sync {
    /// Announces or renews a live instance of the group.
    async fn heartbeat(
        &self,
        consumer: &ConsumerId,
        instance: &str,
        started_ms: u64,
    ) -> Result<(), StoreError>;

    /// Removes an instance's member record (a graceful stop, after it released its leases).
    async fn leave(&self, consumer: &ConsumerId, instance: &str) -> Result<(), StoreError>;

    /// Removes the record of a member judged dead, if it is still as `seen` (a heartbeat that
    /// came meanwhile keeps it). Fails with [`StoreError::ConsumerMoved`] when it changed.
    async fn forget(&self, consumer: &ConsumerId, seen: &Member) -> Result<(), StoreError>;

    /// The group's members (instances with a record, live or not), sorted by instance.
    async fn members(&self, consumer: &ConsumerId) -> Result<Vec<Member>, StoreError>;

    /// One lease per partition of `spec`, in order.
    async fn partition_leases(
        &self,
        consumer: &ConsumerId,
        spec: &GroupSpec,
    ) -> Result<Vec<Lease>, StoreError>;

    /// The group's members and one lease per partition of `spec`.
    async fn group_state(
        &self,
        consumer: &ConsumerId,
        spec: &GroupSpec,
    ) -> Result<GroupState, StoreError> {
        let (members, leases) = futures_util::try_join!(
            self.members(consumer),
            self.partition_leases(consumer, spec)
        )?;
        Ok(GroupState { members, leases })
    }

    /// Takes the partitions whose leases are still as `seen`: one atomic write of each lease
    /// (owner `instance`, the next epoch) and of each partition's position with that epoch
    /// written in, so that a commit decided under an old lease is refused from that moment.
    /// All or none: fails with [`StoreError::ConsumerMoved`] when a lease or a position changed
    /// meanwhile. Several at once cost one write (a new instance takes its whole share at once).
    async fn take(
        &self,
        consumer: &ConsumerId,
        instance: &str,
        seen: &[Lease],
    ) -> Result<Vec<Lease>, StoreError>;

    /// Gives up a partition whose lease is still `seen`.
    async fn release(&self, consumer: &ConsumerId, seen: &Lease) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_fetches_by_the_share_of_partitions_it_keeps() {
        let owning = |owned: u32| CategoryFilter {
            origin_prefix: None,
            partitions: Some(PartitionFilter {
                spec: GroupSpec::new(PartitionKey::Entity),
                after: (0..64).map(|p| (p < owned).then_some(0)).collect(),
            }),
        };
        assert_eq!(CategoryFilter::default().fetch_for(10), Some(10));
        // Every partition: what is missing, a quarter more.
        assert_eq!(owning(64).fetch_for(10), Some(13));
        // Half of them: twice that.
        assert_eq!(owning(32).fetch_for(10), Some(26));
        assert_eq!(owning(1).fetch_for(1), Some(81));
        // An origin filter's share is unknown.
        assert_eq!(CategoryFilter::origin("user.").fetch_for(10), None);
    }

    #[test]
    fn the_partition_function_does_not_change() {
        // Stored groups depend on it: these values must hold in every future version.
        // (SHA-256's first 8 bytes, big-endian, modulo the count; checked with Python's hashlib.)
        assert_eq!(partition_of("42", 32), 13);
        assert_eq!(partition_of("u1", 32), 26);
        assert_eq!(partition_of("u1", 64), 58);
        assert_eq!(partition_of("ann", 64), 46);
        assert_eq!(partition_of("", 32), 20);
        let spread: std::collections::BTreeSet<u32> = (0..1000)
            .map(|i| partition_of(&i.to_string(), 32))
            .collect();
        assert_eq!(spread.len(), 32);
        assert_eq!(partition_of("anything", 1), 0);
        assert_eq!(partition_of("anything", 0), 0);
    }
}
