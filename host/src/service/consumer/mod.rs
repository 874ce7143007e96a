//! The consumer loop: one task per (service, category). It handles due deferred messages, reads
//! its category past its position in pages, decides each page as one commit (see `decide`) while
//! the previous page's commit is in flight (pipelining), and falls back to handling messages one
//! by one (`handle`): retries with backoff, conflicts decided again, park, defer, and settling the
//! consumer's position. Sealed commands always go one by one. This file is the loop and its
//! pages; `one` handles one message to the end.
//!
//! The consumer reads only the partitions this instance owns (all of them where one process owns
//! the store; its leases on a shared one, see `group`), each past its own stored position, and a
//! commit advances the partitions of the messages it settles, each from where it was read.

mod one;

use self::one::{stream_reads, view_reads};

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::conflict::{CONFLICT_PATIENCE, conflict_pause};
use super::decide::{
    BatchDecline, BatchItem, Decider, Decision, Decline, Overlay, decide, decide_batch,
    stored_as_carried,
};
use super::group::Owned;
use super::outcome::{check_outcome, group_appends};
use super::pace::Pace;
use super::projection::ProjectionCache;
use super::{RunnerConfig, record};
use crate::seal;
use crate::store::{
    CategoryFilter, Commit, Committed, ConsumerId, DeferredMessage, GroupSpec, Message,
    MessageStore, ParkedMessage, PartitionFilter, PartitionFrom, PartitionPosition, Settle,
    StoreError, StreamAppend, StreamName, StreamRead, ViewRead, bounded_reason, now_ms,
};
use crate::wasm::{GuestError, ServiceComponent};

/// How long an idle consumer waits for a wake-up before it reads its category again anyway.
const RECHECK_IDLE: Duration = Duration::from_secs(2);

/// How long a consumer on a shared store goes on from the positions it read, while it owns the
/// same partitions and its commits are accepted: its own commits keep them current, and reading
/// them costs a record per partition, which every poll did (most of what the server sent two
/// instances of a service). A change made by another writer (a view rebuild) is seen by then,
/// or at once through the commit it refuses.
const POSITIONS_FRESH_FOR: Duration = Duration::from_secs(1);
/// How far (in global positions) an owned partition with nothing to handle may fall behind what
/// was scanned before it is advanced on its own: on a shared store each partition is a record
/// of its own, and a restart rescans at most this much.
const IDLE_ADVANCE: u64 = 1024;

/// Where a handled message came from, which decides how it is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Category,
    Deferred,
}

pub(super) struct Consumer {
    pub(super) id: ConsumerId,
    /// Where reading goes on: every message of an owned partition at or below it is settled.
    pub(super) position: u64,
    /// The group's split, as stored once joined.
    pub(super) spec: GroupSpec,
    /// Each partition's stored position as this consumer last read or wrote it.
    pub(super) positions: Vec<PartitionPosition>,
    /// When `positions` were last read from the store; `None` when they must be read again.
    pub(super) positions_read: Option<std::time::Instant>,
    /// What this instance owns; changed by its assigner on a shared store.
    pub(super) owned: watch::Receiver<Owned>,
    /// What it owned when this poll began: the only partitions the poll reads. A partition
    /// gained meanwhile waits for the next poll, which starts it from its stored position (read
    /// into a filter built before, its messages would be skipped, and a later commit would
    /// advance it past them).
    pub(super) reading: Owned,
    pub(super) origin_prefix: Option<String>,
    /// Granted the mail capability.
    pub(super) mail: bool,
    /// Handling acts outside the store (the mail deliverer): pages are decided on one thread and
    /// not pipelined, so nothing is done on the strength of work dropped or a commit that fails.
    pub(super) effects: bool,
    pub(super) component: Arc<ServiceComponent>,
    pub(super) projections: Arc<ProjectionCache>,
    pub(super) store: Arc<dyn MessageStore>,
    pub(super) config: RunnerConfig,
    /// How big a page is and over how many threads its entities are decided.
    pub(super) pace: Pace,
    pub(super) shutdown: watch::Receiver<bool>,
}

/// How long a consumer keeps reading pages before it looks at its deferred messages again.
const KEEP_READING_FOR: Duration = Duration::from_millis(250);

/// A page read after the consumer's position (or after the page in flight).
enum NextPage {
    /// Nothing to handle up to `scanned_to` (everything there was filtered out, or nothing).
    Idle {
        scanned_to: u64,
    },
    /// Declined as a batch: handle it one message at a time.
    OneByOne(Arc<[Message]>),
    Decided(Box<DecidedPage>),
}

/// A page decided as one commit, until the store answers.
struct DecidedPage {
    messages: Arc<[Message]>,
    /// The global position of its last message: where the consumer moves.
    last: u64,
    /// The partitions of its messages, which its commit advances.
    partitions: BTreeSet<u32>,
    /// Taken when it is sent, and given its settle then: the page before it is stored by then,
    /// so the partitions' positions are known.
    commit: Option<Commit>,
    parked: u64,
    /// What it writes, for the next page to be decided on top of.
    writes: Arc<Overlay>,
    lanes_met: bool,
    /// The lanes its decisions were made on, and how long that took (the kept attempt).
    lanes: usize,
    decided_in: Duration,
    started: std::time::Instant,
}

/// Why handling stopped without settling the message; it is delivered again later.
enum Interrupted {
    Shutdown,
    /// The stored position changed under the consumer (a view rebuild): read it again.
    Moved,
    Store(StoreError),
}

impl From<StoreError> for Interrupted {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::ConsumerMoved { .. } => Self::Moved,
            e => Self::Store(e),
        }
    }
}

impl Consumer {
    fn service(&self) -> &str {
        self.component.manifest().name.as_str()
    }

    pub(super) async fn run(mut self) {
        tracing::debug!(consumer = %self.id, "consumer started");
        loop {
            match self.poll().await {
                Ok(()) => {}
                Err(Interrupted::Shutdown) => break,
                Err(Interrupted::Moved) => {
                    self.positions_read = None;
                    tracing::info!(consumer = %self.id, "position moved by someone else; reading again");
                }
                Err(Interrupted::Store(e)) => {
                    self.positions_read = None;
                    tracing::error!(consumer = %self.id, "store error, retrying in 1s: {e}");
                    if self.sleep(Duration::from_secs(1)).await.is_err() {
                        break;
                    }
                }
            }
            if *self.shutdown.borrow() {
                break;
            }
        }
        tracing::debug!(consumer = %self.id, "consumer stopped");
    }

    /// Handles what is due, then waits for more.
    async fn poll(&mut self) -> Result<(), Interrupted> {
        // Taken before reading anything, so a write, replay or rebuild that lands while this
        // poll reads is not missed when it goes to sleep below.
        let mut changes = self.store.watch(&self.id).await?;
        let mut owned_changes = self.owned.clone();
        let owned_before =
            std::mem::replace(&mut self.reading, owned_changes.borrow_and_update().clone());
        // Where one process owns the store, reading its group is a local lookup: every poll
        // does, and sees a rebuild at once.
        let read_positions = owned_before != self.reading
            || matches!(self.reading, Owned::All)
            || self
                .positions_read
                .is_none_or(|read| read.elapsed() >= POSITIONS_FRESH_FOR);
        let scanned = if read_positions {
            let group = self.store.join_group(&self.id, self.spec).await?;
            self.positions_read = Some(std::time::Instant::now());
            // Where the last poll got to still holds when it owned what this one does and the
            // positions of those partitions are as it left them (a rebuild or a take-over
            // changes one). Other instances' partitions move with every commit they make and
            // say nothing about what this one scanned: counting them sent each poll back to
            // its slowest owned partition, up to IDLE_ADVANCE behind, to read that again.
            let scanned = (owned_before == self.reading
                && group.spec == self.spec
                && (0..self.spec.partitions).all(|p| {
                    self.reading.epoch(p).is_none()
                        || group.positions.get(p as usize) == self.positions.get(p as usize)
                }))
            .then_some(self.position);
            self.spec = group.spec;
            self.positions = group.positions;
            scanned
        } else {
            Some(self.position)
        };
        let mut next_due = None;
        for deferred in self.store.deferred(&self.id).await? {
            if self.partition_epoch(&deferred.message).is_none() {
                continue;
            }
            if deferred.due_ms > now_ms() {
                next_due = Some(deferred.due_ms);
                break;
            }
            self.handle(deferred.message, Source::Deferred).await?;
        }

        let owned: Vec<u32> = (0..self.spec.partitions)
            .filter(|p| self.owns(*p))
            .collect();
        if owned.is_empty() {
            // Nothing of this group is ours (yet): wait for the assigner. Partitions it gave
            // this instance whose stored records do not show the take yet (a replica that lags)
            // are looked at again once the positions read are stale, not left unread for as
            // long as the lease is held.
            let assigned = matches!(&self.reading, Owned::Leased(leases) if !leases.is_empty());
            let recheck = async {
                match assigned {
                    true => tokio::time::sleep(POSITIONS_FRESH_FOR).await,
                    false => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = owned_changes.changed() => return Ok(()),
                () = recheck => return Ok(()),
                _ = self.shutdown.changed() => return Err(Interrupted::Shutdown),
            }
        }
        // Partitions with nothing new lag behind what was scanned (up to IDLE_ADVANCE on a
        // shared store): starting from the lowest each poll would read that stretch again.
        self.position = owned
            .iter()
            .map(|p| self.positions[*p as usize].position)
            .min()
            .unwrap_or(0)
            .max(scanned.unwrap_or(0));
        if !self.handle_category().await? {
            return Ok(());
        }
        let wait_for_due = async {
            match next_due {
                Some(due) => {
                    tokio::time::sleep(Duration::from_millis(due.saturating_sub(now_ms()))).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = changes.changed() => Ok(()),
            _ = owned_changes.changed() => Ok(()),
            () = wait_for_due => Ok(()),
            // A wake-up can be lost where the store cannot promise it (a JetStream watcher whose
            // server died mid-delivery): an idle consumer looks again now and then regardless.
            () = tokio::time::sleep(RECHECK_IDLE) => Ok(()),
            _ = self.shutdown.changed() => Err(Interrupted::Shutdown),
        }
    }

    /// True when this poll reads `partition`: owned when the poll began and still, under the
    /// epoch its stored position carries (a partition another instance took over since is not
    /// ours, whatever the assigner thinks).
    fn owns(&self, partition: u32) -> bool {
        let stored = self.positions.get(partition as usize).map(|p| p.epoch);
        let owned = self.reading.epoch(partition);
        owned.is_some() && stored == owned && self.owned.borrow().epoch(partition) == owned
    }

    /// The epoch of the partition `message` belongs to, when this instance owns it.
    fn partition_epoch(&self, message: &Message) -> Option<u64> {
        let partition = self.spec.partition_of(message);
        self.owns(partition)
            .then(|| self.positions[partition as usize].epoch)
    }

    /// What a read keeps: the origin filter, and messages of owned partitions past each one's
    /// position (left out when every partition is owned and none is past `from`).
    fn filter(&self, from: u64) -> CategoryFilter {
        let all_owned = matches!(*self.owned.borrow(), Owned::All);
        let partitions = if all_owned && self.positions.iter().all(|p| p.position <= from) {
            None
        } else {
            Some(PartitionFilter {
                spec: self.spec,
                after: (0..self.spec.partitions)
                    .map(|p| self.owns(p).then(|| self.positions[p as usize].position))
                    .collect(),
            })
        };
        CategoryFilter {
            origin_prefix: self.origin_prefix.clone(),
            partitions,
        }
    }

    /// Where one process owns the store, its group is one record: a commit advances every
    /// partition at no extra cost, which keeps them level. On a shared store each partition is
    /// a record of its own, so a commit advances only those it settles messages of.
    fn advances_all(&self) -> bool {
        matches!(*self.owned.borrow(), Owned::All)
    }

    /// The settle that moves `partitions` (every one, where that is free) to `to`.
    fn advance(&self, partitions: impl IntoIterator<Item = u32>, to: u64) -> Settle {
        let moved: Vec<u32> = if self.advances_all() {
            (0..self.spec.partitions).collect()
        } else {
            partitions.into_iter().collect()
        };
        Settle::Advance {
            consumer: self.id.clone(),
            partitions: moved
                .into_iter()
                .filter_map(|partition| {
                    let from = *self.positions.get(partition as usize)?;
                    Some(PartitionFrom { partition, from })
                })
                .collect(),
            to,
        }
    }

    /// Records that a commit moved what `settle` names.
    fn advanced(&mut self, settle: &Settle) {
        if let Settle::Advance { partitions, to, .. } = settle {
            for moved in partitions {
                if let Some(stored) = self.positions.get_mut(moved.partition as usize) {
                    stored.position = *to;
                }
            }
        }
    }

    /// Handles the category's pages from the stored position; true when it ran out of messages,
    /// false when it stopped to let deferred messages in.
    ///
    /// Pages are pipelined: while a page's commit is in flight, the next page is read and decided
    /// on top of what the page in flight writes (its messages and view rows carried into the next
    /// page's overlay), so deciding overlaps the store's flush or round trip. The next page is
    /// kept only if the page in flight was committed; its commit advances the position from where
    /// that page ended, so it can never land without it. A consumer with effects is not
    /// pipelined: nothing is done on the strength of a commit that might fail.
    async fn handle_category(&mut self) -> Result<bool, Interrupted> {
        let began = std::time::Instant::now();
        let overlap = !self.effects;
        let mut in_flight: Option<Box<DecidedPage>> = None;
        loop {
            // A change of ownership ends the poll: the next one reads what is owned then.
            let reading = began.elapsed() < KEEP_READING_FOR
                && !*self.shutdown.borrow()
                && *self.owned.borrow() == self.reading;
            if !reading && in_flight.is_none() {
                return Ok(false);
            }
            let sending = in_flight.as_mut().and_then(|page| {
                let mut commit = page.commit.take()?;
                commit.settle = Some(self.advance(page.partitions.iter().copied(), page.last));
                // Snapshots ride on the next commit; one that fails loses them, and the stream
                // is snapshotted again at its next snapshot point.
                commit.snapshots = self.projections.take_due_snapshots();
                Some(commit)
            });
            let store = self.store.clone();
            let committing = async move {
                match sending {
                    Some(commit) => Some(store.commit(commit).await),
                    None => None,
                }
            };
            let (from, carry) = match &in_flight {
                Some(page) if overlap => (page.last, Some(page.writes.clone())),
                Some(page) => (page.last, None),
                None => (self.position, None),
            };
            let next = async {
                match reading {
                    true => Some(self.next_page(from, carry).await),
                    false => None,
                }
            };
            let (committed, next) = if overlap {
                tokio::join!(committing, next)
            } else {
                let committed = committing.await;
                match committed {
                    Some(Err(_)) => {
                        drop(next);
                        (committed, None)
                    }
                    _ => (committed, next.await),
                }
            };
            if let (Some(result), Some(page)) = (committed, in_flight.take()) {
                match result {
                    Ok(committed) if overlap && !stored_as_carried(&page.writes, &committed) => {
                        // Something else wrote to a stream first, or an event was a duplicate:
                        // the next page was decided on writes that are not what is stored.
                        self.page_stored(page, &committed);
                        continue;
                    }
                    Ok(committed) => self.page_stored(page, &committed),
                    Err(e)
                        if e.is_permanent()
                            || matches!(
                                e,
                                StoreError::Conflict { .. }
                                    | StoreError::ViewChanged { .. }
                                    | StoreError::Duplicate { .. }
                            ) =>
                    {
                        // The page goes one by one (where a message whose own commit can never
                        // succeed is parked); the next page, decided on top of it, is dropped
                        // and read again.
                        self.one_by_one(&page.messages).await?;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            match next.transpose()? {
                None => {}
                Some(NextPage::Idle { scanned_to }) => {
                    // Everything scanned was filtered out (or belongs to others): remember that
                    // for partitions far enough behind, so a restart does not rescan it.
                    let behind: Vec<u32> = (0..self.spec.partitions)
                        .filter(|p| {
                            self.owns(*p)
                                && self.positions[*p as usize].position
                                    < match self.advances_all() {
                                        true => scanned_to,
                                        false => scanned_to.saturating_sub(IDLE_ADVANCE),
                                    }
                        })
                        .collect();
                    if !behind.is_empty() {
                        let settle = self.advance(behind, scanned_to);
                        self.settle_only(settle.clone()).await?;
                        self.advanced(&settle);
                    }
                    self.position = self.position.max(scanned_to);
                    return Ok(true);
                }
                Some(NextPage::OneByOne(messages)) => self.one_by_one(&messages).await?,
                Some(NextPage::Decided(page)) => {
                    if page.lanes_met {
                        tracing::debug!(consumer = %self.id, "handlers read or wrote across entities: deciding pages on one thread");
                        self.pace.one_lane();
                    }
                    self.pace
                        .decided(page.messages.len(), page.lanes, page.decided_in);
                    in_flight = Some(page);
                }
            }
        }
    }

    /// Handles messages one at a time, each with its own commit.
    async fn one_by_one(&mut self, messages: &[Message]) -> Result<(), Interrupted> {
        for message in messages {
            let global = message.global_position;
            let settle = self.settle(message, Source::Category);
            self.handle(message.clone(), Source::Category).await?;
            self.advanced(&settle);
            self.position = global;
        }
        if let Some(last) = messages.last() {
            self.position = self.position.max(last.global_position);
        }
        Ok(())
    }

    /// Reads the page after `from` and decides it as one commit: every outcome, parked and
    /// deferred message, and the consumer's new position. `carry` is what the page in flight
    /// writes, seen by this page as if it were stored.
    async fn next_page(
        &self,
        from: u64,
        carry: Option<Arc<Overlay>>,
    ) -> Result<NextPage, Interrupted> {
        let page = self
            .store
            .read_category(
                &self.id.category,
                from,
                &self.filter(from),
                self.pace.page_limit(),
            )
            .await?;
        let Some(last) = page.messages.last().map(|m| m.global_position) else {
            return Ok(NextPage::Idle {
                scanned_to: page.scanned_to,
            });
        };
        // Shared, not copied: the lanes read it, the one-by-one path needs it only when the
        // page is declined.
        let messages: Arc<[Message]> = page.messages.into();
        // Sealed commands are rare and go one by one, where their keys are read and shredded:
        // one mechanism, and a page without any costs one look at each field's kind.
        if self.id.category.is_command() && messages.iter().any(seal::is_sealed) {
            return Ok(NextPage::OneByOne(messages));
        }
        let started = std::time::Instant::now();
        let decider = Decider {
            component: self.component.clone(),
            projections: self.projections.clone(),
            store: self.store.clone(),
            mail: self.mail,
            effects: self.effects,
            reuse_instances: self.config.reuse_instances,
        };
        let lanes = self.pace.lanes_for(messages.len());
        let decision = match decide_batch(decider, messages.clone(), carry, lanes).await {
            Ok(decision) => decision,
            Err(BatchDecline::OneByOne) => return Ok(NextPage::OneByOne(messages)),
            Err(BatchDecline::Store(e)) => return Err(e.into()),
        };
        let partitions = messages.iter().map(|m| self.spec.partition_of(m)).collect();
        let mut commit = Commit::default();
        let mut outgoing = Vec::new();
        let mut parked = 0;
        for item in decision.items {
            match item {
                BatchItem::Decided(checked) => {
                    outgoing.extend(checked.messages);
                    commit.views.extend(checked.views);
                }
                BatchItem::Park { message, reason } => {
                    tracing::warn!(consumer = %self.id, id = %message.id, "parked: {reason}");
                    parked += 1;
                    commit.park.push(ParkedMessage {
                        consumer: self.id.clone(),
                        message,
                        reason: bounded_reason(reason),
                        attempts: 1,
                        parked_at_ms: now_ms(),
                    });
                }
                BatchItem::Defer { message, due_ms } => {
                    commit.defer.push(DeferredMessage {
                        consumer: self.id.clone(),
                        message,
                        due_ms,
                    });
                }
            }
        }
        commit.appends = group_appends(outgoing, |stream| decision.expected.get(stream).copied());
        commit.stream_reads = stream_reads(&commit.appends, decision.expected);
        commit.view_reads = view_reads(decision.read_rows);
        // A message whose id is stored (the outcome of a replayed message) would be dropped, and
        // later messages of the page must not have seen it: the store refuses such a page,
        // which then goes one by one.
        commit.refuse_duplicates = true;
        Ok(NextPage::Decided(Box::new(DecidedPage {
            messages,
            last,
            partitions,
            commit: Some(commit),
            parked,
            writes: Arc::new(decision.writes),
            lanes_met: decision.lanes_met,
            lanes: decision.lanes,
            decided_in: decision.took,
            started,
        })))
    }

    /// What follows a page's commit: the position and the metrics.
    fn page_stored(&mut self, page: Box<DecidedPage>, committed: &Committed) {
        let settled = self.advance(page.partitions.iter().copied(), page.last);
        self.advanced(&settled);
        let count = page.messages.len() as u64;
        tracing::debug!(
            consumer = %self.id, count, written = committed.written.len(),
            duplicates = committed.duplicates.len(), "handled a batch"
        );
        record(
            self.component.manifest().name.as_str(),
            count - page.parked,
            page.parked,
            page.started.elapsed(),
        );
        self.position = page.last;
    }

    async fn sleep(&mut self, duration: Duration) -> Result<(), Interrupted> {
        tokio::select! {
            () = tokio::time::sleep(duration) => Ok(()),
            _ = self.shutdown.changed() => Err(Interrupted::Shutdown),
        }
    }
}
