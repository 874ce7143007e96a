//! Consumer groups on JetStream: the group record, one position record per partition, and the
//! membership and leases that let several processes share a group's partitions.
//!
//! Everything is a rolled-up subject of the namespace's stream, changed by compare-and-set
//! (`Nats-Expected-Last-Subject-Sequence`); no second coordination service. A take-over is one
//! atomic batch of the lease (new owner, next epoch) and the partition's position (the same
//! position, the new epoch written in). Every commit that advances the partition expects the
//! position record as its consumer read it, so a commit decided under the old lease is refused
//! by the server from the moment the take-over is stored: the fence.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{
    BatchRefused, Entry, NatsStore, Outgoing, PAGE, RACE_RETRIES, backend, decode, decode_position,
    to_json, untoken,
};
use crate::store::{
    Category, ConsumerId, ConsumerInfo, Group, GroupSpec, InstanceInfo, Lease, Leases, Member,
    MessageStore, PartitionInfo, PartitionPosition, StoreError, now_ms,
};

/// Most category messages a listing decodes to count each partition's lag; past that, the
/// rest counts toward the consumer's lag only.
const LAG_SCAN: usize = 100_000;

/// A lease as stored.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredLease {
    owner: Option<String>,
    epoch: u64,
    changed_ms: u64,
}

/// A member record as stored.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredMember {
    instance: String,
    started_ms: u64,
    #[serde(default)]
    heartbeat_ms: u64,
}

fn put(subject: String, payload: Vec<u8>, expect: Option<u64>) -> Outgoing {
    Outgoing {
        subject,
        payload,
        expect,
        expect_subject: None,
        rollup: true,
        erases: None,
    }
}

impl NatsStore {
    fn group_subject(&self, consumer: &ConsumerId) -> String {
        self.subject(&format!("group.{}", Self::consumer_part(consumer)))
    }

    fn lease_subject(&self, consumer: &ConsumerId, partition: u32) -> String {
        self.subject(&format!(
            "lease.{}.{partition}",
            Self::consumer_part(consumer)
        ))
    }

    fn member_subject(&self, consumer: &ConsumerId, instance: &str) -> String {
        self.subject(&format!(
            "member.{}.{}",
            Self::consumer_part(consumer),
            super::token(instance)
        ))
    }

    /// Entries of `<kind>.<category>.<consumer>.*` keyed by their last token.
    pub(super) async fn per_partition(
        &self,
        kind: &str,
        consumer: &ConsumerId,
    ) -> Result<Vec<(String, Entry)>, StoreError> {
        let prefix = self.subject(&format!("{kind}.{}.", Self::consumer_part(consumer)));
        Ok(self
            .all(&format!("{prefix}*"))
            .await?
            .into_iter()
            .filter_map(|entry| {
                let last = entry.subject.strip_prefix(&prefix)?.to_owned();
                Some((last, entry))
            })
            .collect())
    }

    /// The stored position of each partition that has one.
    pub(super) async fn partition_positions(
        &self,
        consumer: &ConsumerId,
    ) -> Result<Vec<(u32, PartitionPosition)>, StoreError> {
        let mut positions = Vec::new();
        for (partition, entry) in self.per_partition("pos", consumer).await? {
            if let Ok(partition) = partition.parse() {
                positions.push((partition, decode_position(&entry)?));
            }
        }
        Ok(positions)
    }

    pub(super) async fn stored_group(
        &self,
        consumer: &ConsumerId,
    ) -> Result<Option<Group>, StoreError> {
        let Some(entry) = self.last(&self.group_subject(consumer)).await? else {
            return Ok(None);
        };
        let spec: GroupSpec = decode("consumer group", &entry)?;
        let mut positions = vec![PartitionPosition::default(); spec.partitions.max(1) as usize];
        for (partition, position) in self.partition_positions(consumer).await? {
            if let Some(slot) = positions.get_mut(partition as usize) {
                *slot = position;
            }
        }
        Ok(Some(Group { spec, positions }))
    }

    /// Creates the group unless it exists: the group record (expected absent, so two processes
    /// creating it at once agree on one), every partition at the position of the format before
    /// groups, and that old position emptied, in one atomic batch.
    pub(super) async fn join_group_now(
        &self,
        consumer: &ConsumerId,
        spec: GroupSpec,
    ) -> Result<Group, StoreError> {
        for _ in 0..RACE_RETRIES {
            if let Some(group) = self.stored_group(consumer).await? {
                return Ok(group);
            }
            let legacy = self.last(&self.position_subject(consumer)).await?;
            let start = match &legacy {
                Some(entry) if !entry.payload.is_empty() => decode_position(entry)?.position,
                _ => 0,
            };
            let spec = GroupSpec {
                partitions: spec.partitions.max(1),
                ..spec
            };
            let mut batch = vec![put(self.group_subject(consumer), to_json(&spec)?, Some(0))];
            for partition in 0..spec.partitions {
                let position = PartitionPosition {
                    position: start,
                    epoch: 0,
                };
                // Expected absent: a lease taken on a group that does not exist yet must not be
                // overwritten (assigners join before they take, so this is a guard).
                batch.push(put(
                    self.partition_subject(consumer, partition),
                    to_json(&position)?,
                    Some(0),
                ));
            }
            if legacy.is_some() {
                batch.push(put(self.position_subject(consumer), Vec::new(), None));
            }
            match self.publish(batch).await {
                Ok(_) | Err(BatchRefused::Raced) => continue,
                Err(BatchRefused::Other(e)) => return Err(e),
            }
        }
        Err(backend("join group", "raced other writers too often"))
    }

    /// Consumer groups (and positions of the format before groups) with each partition's
    /// position, lag and lease holder.
    pub(super) async fn list_consumers(
        &self,
        category: Option<&Category>,
    ) -> Result<Vec<ConsumerInfo>, StoreError> {
        let filter = match category {
            Some(category) => format!("{}.*", category.as_str()),
            None => "*.*".to_owned(),
        };
        let mut listed = Vec::new();
        for kind in ["group", "pos"] {
            let prefix = format!("{}.{kind}.", self.inner.ns);
            for entry in self.all(&self.subject(&format!("{kind}.{filter}"))).await? {
                if entry.payload.is_empty() {
                    continue;
                }
                let Some((category, name)) = entry
                    .subject
                    .strip_prefix(&prefix)
                    .and_then(|rest| rest.split_once('.'))
                else {
                    continue;
                };
                let category = Category::parse(category)?;
                let name = untoken(name).ok_or_else(|| {
                    backend("read", format!("bad consumer subject {}", entry.subject))
                })?;
                let consumer = ConsumerId::new(category, name);
                let info = match kind {
                    "group" => self.group_info(consumer).await?,
                    // A consumer of the format before groups that never joined one.
                    _ => match self.stored_group(&consumer).await? {
                        Some(_) => None,
                        None => Some(self.ungrouped_info(consumer, &entry).await?),
                    },
                };
                listed.extend(info);
            }
        }
        listed.sort_by(|a, b| a.consumer.cmp(&b.consumer));
        Ok(listed)
    }

    async fn group_info(&self, consumer: ConsumerId) -> Result<Option<ConsumerInfo>, StoreError> {
        let Some(group) = self.stored_group(&consumer).await? else {
            return Ok(None);
        };
        let state = self.group_state(&consumer, &group.spec).await?;
        let mut partitions: Vec<PartitionInfo> = group
            .positions
            .iter()
            .zip(&state.leases)
            .enumerate()
            .map(|(partition, (position, lease))| PartitionInfo {
                partition: partition as u32,
                position: position.position,
                epoch: position.epoch,
                lag: 0,
                owner: lease.owner.clone(),
            })
            .collect();
        let instances = state
            .members
            .iter()
            .map(|member| {
                let held: Vec<&Lease> = state
                    .leases
                    .iter()
                    .filter(|lease| lease.owner.as_deref() == Some(member.instance.as_str()))
                    .collect();
                InstanceInfo {
                    instance: member.instance.clone(),
                    started_ms: member.started_ms,
                    heartbeat_ms: member.heartbeat_ms,
                    partitions: held.iter().map(|lease| lease.partition).collect(),
                    held_since_ms: held.iter().map(|lease| lease.changed_ms).min().unwrap_or(0),
                }
            })
            .collect();
        let messages = self.category_filter(&consumer.category);
        let low = group.low();
        let mut lag = 0;
        let mut from = low + 1;
        let mut scanned = 0;
        loop {
            let (entries, pending) = self.page(&messages, from, PAGE).await?;
            let Some(last) = entries.last() else { break };
            from = last.seq + 1;
            for entry in &entries {
                let message = self.decode_message(entry)?;
                let info = &mut partitions[group.spec.partition_of(&message) as usize];
                if message.global_position > info.position {
                    info.lag += 1;
                    lag += 1;
                }
            }
            scanned += entries.len();
            if pending == 0 {
                break;
            }
            if scanned >= LAG_SCAN {
                lag += pending;
                break;
            }
        }
        Ok(Some(ConsumerInfo {
            category_head: self.last(&messages).await?.map_or(0, |e| e.seq),
            deferred: self.deferred(&consumer).await?.len() as u64,
            consumer,
            position: low,
            lag,
            partitions,
            instances,
        }))
    }

    async fn ungrouped_info(
        &self,
        consumer: ConsumerId,
        entry: &Entry,
    ) -> Result<ConsumerInfo, StoreError> {
        let position = decode_position(entry)?.position;
        let messages = self.category_filter(&consumer.category);
        Ok(ConsumerInfo {
            category_head: self.last(&messages).await?.map_or(0, |e| e.seq),
            lag: self.count_after(&messages, position).await?,
            deferred: self.deferred(&consumer).await?.len() as u64,
            consumer,
            position,
            partitions: Vec::new(),
            instances: Vec::new(),
        })
    }

    async fn publish_guarded(&self, batch: Vec<Outgoing>) -> Result<u64, StoreError> {
        match self.publish(batch).await {
            Ok(first) => Ok(first),
            Err(BatchRefused::Raced) => Err(StoreError::ConsumerMoved {
                consumer: "a lease".into(),
                expected: 0,
                actual: 0,
            }),
            Err(BatchRefused::Other(e)) => Err(e),
        }
    }
}

#[async_trait]
impl Leases for NatsStore {
    async fn heartbeat(
        &self,
        consumer: &ConsumerId,
        instance: &str,
        started_ms: u64,
    ) -> Result<(), StoreError> {
        let member = StoredMember {
            instance: instance.to_owned(),
            started_ms,
            heartbeat_ms: now_ms(),
        };
        self.publish_guarded(vec![put(
            self.member_subject(consumer, instance),
            to_json(&member)?,
            None,
        )])
        .await
        .map(drop)
    }

    async fn leave(&self, consumer: &ConsumerId, instance: &str) -> Result<(), StoreError> {
        self.publish_guarded(vec![put(
            self.member_subject(consumer, instance),
            Vec::new(),
            None,
        )])
        .await
        .map(drop)
    }

    async fn forget(&self, consumer: &ConsumerId, seen: &Member) -> Result<(), StoreError> {
        self.publish_guarded(vec![put(
            self.member_subject(consumer, &seen.instance),
            Vec::new(),
            Some(seen.revision),
        )])
        .await
        .map(drop)
    }

    async fn members(&self, consumer: &ConsumerId) -> Result<Vec<Member>, StoreError> {
        let mut members = Vec::new();
        for (_, entry) in self.per_partition("member", consumer).await? {
            if entry.payload.is_empty() {
                continue;
            }
            let member: StoredMember = decode("member", &entry)?;
            members.push(Member {
                instance: member.instance,
                revision: entry.seq,
                started_ms: member.started_ms,
                heartbeat_ms: member.heartbeat_ms,
            });
        }
        members.sort_by(|a, b| a.instance.cmp(&b.instance));
        Ok(members)
    }

    async fn partition_leases(
        &self,
        consumer: &ConsumerId,
        spec: &GroupSpec,
    ) -> Result<Vec<Lease>, StoreError> {
        let mut stored: BTreeMap<u32, Lease> = BTreeMap::new();
        for (partition, entry) in self.per_partition("lease", consumer).await? {
            let Ok(partition) = partition.parse::<u32>() else {
                continue;
            };
            let lease: StoredLease = decode("lease", &entry)?;
            stored.insert(
                partition,
                Lease {
                    partition,
                    owner: lease.owner,
                    epoch: lease.epoch,
                    changed_ms: lease.changed_ms,
                    revision: entry.seq,
                },
            );
        }
        Ok((0..spec.partitions.max(1))
            .map(|partition| {
                stored.remove(&partition).unwrap_or(Lease {
                    partition,
                    owner: None,
                    epoch: 0,
                    changed_ms: 0,
                    revision: 0,
                })
            })
            .collect())
    }

    async fn take(
        &self,
        consumer: &ConsumerId,
        instance: &str,
        seen: &[Lease],
    ) -> Result<Vec<Lease>, StoreError> {
        let subjects: Vec<String> = seen
            .iter()
            .map(|lease| self.partition_subject(consumer, lease.partition))
            .collect();
        let current = self.lasts(subjects.clone()).await?;
        let changed_ms = now_ms();
        let mut batch = Vec::with_capacity(seen.len() * 2);
        let mut taken = Vec::with_capacity(seen.len());
        for (lease, position_subject) in seen.iter().zip(subjects) {
            let current = current.get(&position_subject).and_then(Option::as_ref);
            let position = match current {
                Some(entry) => decode_position(entry)?,
                None => PartitionPosition::default(),
            };
            let epoch = lease.epoch.max(position.epoch) + 1;
            let stored = StoredLease {
                owner: Some(instance.to_owned()),
                epoch,
                changed_ms,
            };
            let fenced = PartitionPosition {
                position: position.position,
                epoch,
            };
            batch.push(put(
                self.lease_subject(consumer, lease.partition),
                to_json(&stored)?,
                Some(lease.revision),
            ));
            batch.push(put(
                position_subject,
                to_json(&fenced)?,
                Some(current.map_or(0, |e| e.seq)),
            ));
            taken.push(Lease {
                partition: lease.partition,
                owner: stored.owner,
                epoch,
                changed_ms,
                revision: 0,
            });
        }
        if batch.is_empty() {
            return Ok(taken);
        }
        let first = self.publish_guarded(batch).await?;
        // Each lease is the first of its pair in the batch.
        for (index, lease) in taken.iter_mut().enumerate() {
            lease.revision = first + 2 * index as u64;
        }
        Ok(taken)
    }

    async fn release(&self, consumer: &ConsumerId, seen: &Lease) -> Result<(), StoreError> {
        let lease = StoredLease {
            owner: None,
            epoch: seen.epoch,
            changed_ms: now_ms(),
        };
        self.publish_guarded(vec![put(
            self.lease_subject(consumer, seen.partition),
            to_json(&lease)?,
            Some(seen.revision),
        )])
        .await
        .map(drop)
    }
}
