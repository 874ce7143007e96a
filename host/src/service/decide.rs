//! Deciding: running the guest's handler on the projected state. One message at a time
//! (`decide`, for the one-by-one path) or a whole page (`decide_batch`): the page split by entity
//! into lanes, each decided in order (`decide_lane`) with an `Overlay` of what the page (and the
//! page in flight) has decided but not yet stored, and the lanes checked afterwards for having
//! met.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;
use tokio::runtime::Handle;

use super::host_imports::StoreHost;
use super::outcome::{CheckedOutcome, check_outcome};
use super::projection::{Folded, ProjectionCache, fold, prefetch_entities};
use crate::seal::Redactor;
use crate::store::{Committed, Message, MessageStore, StoreError, StreamName, StreamRead, now_ms};
use crate::wasm::{GuestError, Outcome, ServiceComponent};

/// A handler's decision and the entity version it was made on.
pub(super) struct Decision {
    pub(super) outcome: Outcome,
    pub(super) entity: Option<StreamName>,
    pub(super) version: u64,
    /// Streams the handler read through the host, at the version it saw: an outcome that
    /// writes to one of them expects it still there (a username claim decided on an empty
    /// claim stream must not land after another instance's claim).
    pub(super) read_versions: HashMap<StreamName, u64>,
    /// View rows the handler read from the store, as it saw them (`None`: no row): the commit
    /// holds only while they are unchanged.
    pub(super) read_rows: HashMap<(String, String), Option<Value>>,
    /// Emails the handler asked to deliver (id, text), for its commit to put in the outbox.
    pub(super) emails: Vec<(String, String)>,
}

pub(super) enum Decline {
    Guest(GuestError),
    /// The handler failed, having seen the entity at this version.
    Handler(GuestError, Option<StreamRead>),
    Store(StoreError),
}

/// The entity whose projection a handler receives: for a command, the stream it targets; for an
/// event, its own stream when it lies in the service's category, or else its `originEntity` when
/// that does.
pub fn entity_of(service: &str, message: &Message) -> Option<StreamName> {
    if message.stream.is_command() {
        return Some(message.stream.entity_stream());
    }
    if message.stream.category_str() == service {
        return Some(message.stream.clone());
    }
    message
        .origin_entity()
        .and_then(|origin| StreamName::parse(origin).ok())
        .filter(|origin| !origin.is_command() && origin.category_str() == service)
}

/// Runs the guest for one message on a blocking thread: a fresh instance, the projection, the
/// handler.
pub(super) async fn decide(
    component: Arc<ServiceComponent>,
    projections: Arc<ProjectionCache>,
    store: Arc<dyn MessageStore>,
    mail: bool,
    message: Message,
    redactor: Option<Arc<Redactor>>,
) -> Result<Decision, Decline> {
    let runtime = Handle::current();
    let joined = tokio::task::spawn_blocking(move || {
        let service = component.manifest().name.clone();
        let entity = entity_of(&service, &message);
        // Nothing is pending for one message: the overlay only records what the handler read.
        let reads = SharedOverlay::default();
        let host = StoreHost {
            runtime: runtime.clone(),
            store: store.clone(),
            service,
            handled_id: message.id.clone(),
            handled_global: message.global_position,
            mail,
            overlay: Some(reads.clone()),
            redactor,
        };
        let mut instance = component
            .instantiate(Box::new(host))
            .map_err(Decline::Guest)?;
        let (state, version) = match &entity {
            Some(stream) => {
                let start = projections.get(stream);
                let (state, version) = fold(
                    &runtime,
                    Some(store.as_ref()),
                    None,
                    Some(&projections),
                    &mut instance,
                    stream,
                    start,
                    None,
                )?;
                projections.put(stream, version, &state);
                (state, version)
            }
            None => (None, 0),
        };
        let outcome = if message.stream.is_command() {
            instance.handle_command(&message, state.as_deref())
        } else {
            instance.handle_event(&message, state.as_deref())
        }
        .map_err(|error| {
            // A refusal rests on the state it saw, as an outcome does: parked, it is checked.
            let read = entity.clone().map(|stream| StreamRead { stream, version });
            Decline::Handler(error, read)
        })?;
        let (read_versions, read_rows, emails) = reads
            .lock()
            .map(|mut reads| {
                (
                    reads.read_versions.clone(),
                    reads.read_rows.clone(),
                    std::mem::take(&mut reads.emails),
                )
            })
            .unwrap_or_default();
        Ok(Decision {
            outcome,
            entity,
            version,
            read_versions,
            read_rows,
            emails,
        })
    });
    match joined.await {
        Ok(result) => result,
        Err(e) => Err(Decline::Guest(GuestError::Trap(format!(
            "the handler thread failed: {e}"
        )))),
    }
}

/// What a batch decided for one message.
pub(super) enum BatchItem {
    Decided(CheckedOutcome),
    Park { message: Message, reason: String },
    Defer { message: Message, due_ms: u64 },
}

/// A batch's decisions, ready to be committed together.
#[derive(Default)]
pub(super) struct BatchDecision {
    pub(super) items: Vec<BatchItem>,
    /// The version of each entity the batch projected, as the batch found it (stored, plus what
    /// the page in flight writes), and of each stream a handler read to its end: the expected
    /// versions of those it appends to, the checked reads of the others.
    pub(super) expected: HashMap<StreamName, u64>,
    /// View rows handlers read (from the store, or as the page in flight writes them), as they
    /// saw them: checked by the commit.
    pub(super) read_rows: HashMap<(String, String), Option<Value>>,
    /// The page was tried in lanes, which met; it was decided on one thread instead.
    pub(super) lanes_met: bool,
    /// The lanes the kept decisions were made on, and how long that attempt took: what the
    /// consumer's pace learns from.
    pub(super) lanes: usize,
    pub(super) took: std::time::Duration,
    /// The messages and view rows it writes, as the next page's overlay starts.
    pub(super) writes: Overlay,
}

/// What a page is decided with: the service's code, its cached states, the store it reads, and
/// whether it is granted the mail capability.
#[derive(Clone)]
pub(super) struct Decider {
    pub(super) component: Arc<ServiceComponent>,
    pub(super) projections: Arc<ProjectionCache>,
    pub(super) store: Arc<dyn MessageStore>,
    pub(super) mail: bool,
    /// Handling acts outside the store (the host's mail deliverer): decided on one thread, so
    /// nothing is done by work that is dropped.
    pub(super) effects: bool,
    pub(super) reuse_instances: bool,
}

/// Why a batch could not be decided as one.
pub(super) enum BatchDecline {
    /// A message failed transiently: handle the page one message at a time, with retries.
    OneByOne,
    Store(StoreError),
}

/// Decides a page of messages so that their outcomes can be committed together with one flush.
///
/// The page's entities are spread over `lanes` blocking threads, each deciding its messages in
/// page order. That is only the same as deciding the whole page in order when the lanes did not
/// meet: no stream was projected or written by two lanes, no view row written by two, and no
/// handler read through the host (a view row, another stream) what another lane wrote. When they met, the lanes' work is dropped and the page is decided again
/// on one thread (and `lanes_met` tells the consumer to stop trying). A handler with effects
/// outside the store (the mail deliverer) always uses one thread, so no email is sent by work
/// that is dropped.
pub(super) async fn decide_batch(
    decider: Decider,
    messages: Arc<[Message]>,
    carry: Option<Arc<Overlay>>,
    lanes: usize,
) -> Result<BatchDecision, BatchDecline> {
    let runtime = Handle::current();
    let split = if !decider.effects {
        split_by_entity(&decider.component.manifest().name, &messages, lanes)
    } else {
        Vec::new()
    };
    let mut lanes_met = false;
    if split.len() > 1 {
        let tried = std::time::Instant::now();
        let mut deciding = Vec::with_capacity(split.len());
        for lane in split {
            let (runtime, decider, messages, carry) = (
                runtime.clone(),
                decider.clone(),
                messages.clone(),
                carry.clone(),
            );
            deciding.push(tokio::task::spawn_blocking(move || {
                decide_lane(
                    &runtime,
                    &decider,
                    carry.as_deref(),
                    lane.iter().map(|&i| &messages[i]),
                )
            }));
        }
        let mut decided = Vec::with_capacity(deciding.len());
        for lane in deciding {
            decided.push(lane.await.map_err(|_| BatchDecline::OneByOne)??);
        }
        if lanes_apart(&decided) {
            let lanes = decided.len();
            return Ok(BatchDecision {
                lanes,
                took: tried.elapsed(),
                ..merge_lanes(decided)
            });
        }
        lanes_met = true;
    }
    let tried = std::time::Instant::now();
    let joined = tokio::task::spawn_blocking(move || {
        decide_lane(&runtime, &decider, carry.as_deref(), messages.iter())
    })
    .await;
    let mut decision = joined.map_err(|_| BatchDecline::OneByOne)??.decision;
    decision.lanes_met = lanes_met;
    decision.lanes = 1;
    decision.took = tried.elapsed();
    Ok(decision)
}

/// Splits a page by entity into at most `lanes` lanes of indices into the page, keeping page
/// order within each; empty when one lane would hold everything.
fn split_by_entity(service: &str, messages: &[Message], lanes: usize) -> Vec<Vec<usize>> {
    if lanes < 2 {
        return Vec::new();
    }
    let mut split: Vec<Vec<usize>> = vec![Vec::new(); lanes];
    for (index, message) in messages.iter().enumerate() {
        let lane = entity_of(service, message).map_or(0, |entity| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&entity, &mut hasher);
            std::hash::Hasher::finish(&hasher) as usize % lanes
        });
        split[lane].push(index);
    }
    split.retain(|lane| !lane.is_empty());
    if split.len() < 2 {
        return Vec::new();
    }
    split
}

/// What one lane decided, and what it touched.
struct LaneDecision {
    decision: BatchDecision,
    /// Streams projected or written.
    streams: HashSet<StreamName>,
    /// View rows written.
    views: HashSet<(String, String)>,
    /// What handlers read through the host.
    host_reads: HostReads,
}

/// True when no two lanes could have seen each other's decisions: each stream projected or
/// written in one lane only, each view row written in one only, and nothing a handler read
/// through the host written by another lane. (Reading what no lane writes is the same on any
/// thread: a username claim read and written by its own registration keeps lanes apart.)
fn lanes_apart(lanes: &[LaneDecision]) -> bool {
    let mut streams = HashSet::new();
    let mut views = HashSet::new();
    let touched_once = lanes.iter().all(|lane| {
        lane.streams.iter().all(|stream| streams.insert(stream))
            && lane.views.iter().all(|row| views.insert(row))
    });
    touched_once
        && lanes.iter().enumerate().all(|(i, lane)| {
            lanes
                .iter()
                .enumerate()
                .all(|(j, other)| i == j || !lane.read_what_was_written_by(other))
        })
}

impl LaneDecision {
    /// True when a handler of this lane read through the host a stream or view row that `other`
    /// wrote: on one thread it might have seen that write.
    fn read_what_was_written_by(&self, other: &LaneDecision) -> bool {
        self.host_reads
            .streams
            .iter()
            .any(|stream| other.decision.writes.pending.contains_key(stream))
            || self
                .host_reads
                .views
                .iter()
                .any(|row| other.views.contains(row))
    }
}

fn merge_lanes(lanes: Vec<LaneDecision>) -> BatchDecision {
    let mut merged = BatchDecision::default();
    for lane in lanes {
        merged.items.extend(lane.decision.items);
        merged.expected.extend(lane.decision.expected);
        for (row, seen) in lane.decision.read_rows {
            merged.read_rows.entry(row).or_insert(seen);
        }
        merged.writes.pending.extend(lane.decision.writes.pending);
        merged.writes.views.extend(lane.decision.writes.views);
    }
    merged
}

/// Decides messages in order on this (blocking) thread, each in a fresh instance, each seeing
/// what the earlier ones decided (through an [`Overlay`]) on top of what `carry` holds (the
/// writes of the page in flight).
fn decide_lane<'a>(
    runtime: &Handle,
    decider: &Decider,
    carry: Option<&Overlay>,
    messages: impl ExactSizeIterator<Item = &'a Message>,
) -> Result<LaneDecision, BatchDecline> {
    let Decider {
        component,
        projections,
        store,
        mail,
        effects: _,
        reuse_instances,
    } = decider;
    let manifest = component.manifest();
    let messages: Vec<&Message> = messages.collect();
    let mut prefetched = prefetch_entities(
        runtime,
        projections,
        store.as_ref(),
        &manifest.name,
        &messages,
    )
    .map_err(BatchDecline::Store)?;
    let carried: HashMap<StreamName, usize> = carry
        .map(|carry| {
            carry
                .pending
                .iter()
                .map(|(stream, (_, added))| (stream.clone(), added.len()))
                .collect()
        })
        .unwrap_or_default();
    let carried_of = |stream: &StreamName| carried.get(stream).copied().unwrap_or(0);
    let mut carried_overlay = carry.cloned().unwrap_or_default();
    // Rows the page in flight read are its commit's to check, not this page's; what it wrote
    // is carried.
    carried_overlay.read_rows.clear();
    carried_overlay.written_here.clear();
    let overlay: SharedOverlay = Arc::new(std::sync::Mutex::new(carried_overlay));
    // View rows this lane writes (the overlay also holds the carried ones).
    let mut own_views: HashSet<(String, String)> = HashSet::new();
    let mut states: HashMap<StreamName, Folded> = HashMap::new();
    let mut reusable: Option<crate::wasm::GuestInstance> = None;
    let mut decision = BatchDecision {
        items: Vec::with_capacity(messages.len()),
        ..BatchDecision::default()
    };
    for message in messages {
        if let Some(due_ms) = message.not_before_ms
            && due_ms > now_ms()
        {
            decision.items.push(BatchItem::Defer {
                message: message.clone(),
                due_ms,
            });
            continue;
        }
        let entity = entity_of(&manifest.name, message);
        let host = StoreHost {
            runtime: runtime.clone(),
            store: store.clone(),
            service: manifest.name.clone(),
            handled_id: message.id.clone(),
            handled_global: message.global_position,
            mail: *mail,
            overlay: Some(overlay.clone()),
            redactor: None,
        };
        let instance = match reusable.take() {
            Some(mut instance) => {
                instance.set_host(Box::new(host));
                Ok(instance)
            }
            None => component.instantiate(Box::new(host)),
        };
        let decided = instance.map_err(Decline::Guest).and_then(|mut instance| {
            let state = match &entity {
                Some(stream) => {
                    let start = match states.get(stream) {
                        // Folded earlier in this page, what is new can only be pending here:
                        // a write by someone else since then fails the commit's expected
                        // version, so the store is read only by the first fold.
                        Some(folded) => folded.clone(),
                        None => {
                            // The prefetched page serves only while this lane has nothing
                            // pending on the stream: a pending base read after it may be past
                            // what it holds, and merging would skip the stored events in
                            // between. (A carried base was known before it was read.)
                            let nothing_pending = overlay.lock().is_ok_and(|o| {
                                o.pending
                                    .get(stream)
                                    .is_none_or(|(_, added)| added.len() == carried_of(stream))
                            });
                            let (start, first_page) =
                                match prefetched.remove(stream).filter(|_| nothing_pending) {
                                    Some((start, page)) => (start, Some(page)),
                                    None => (projections.get(stream), None),
                                };
                            // Stored events first, alone: that state is worth caching even
                            // when pending ones follow (the next fold reads only what is new).
                            let stored = fold(
                                runtime,
                                Some(store.as_ref()),
                                None,
                                Some(projections),
                                &mut instance,
                                stream,
                                start,
                                first_page,
                            )?;
                            // Stored events only, so true whatever becomes of this page. (A
                            // state folded over pending events saw them without their global
                            // positions, so it is never kept.)
                            projections.put(stream, stored.1, &stored.0);
                            stored
                        }
                    };
                    // Then what is pending: carried from the page in flight, or added here.
                    let folded = fold(
                        runtime,
                        None,
                        Some(&overlay),
                        None,
                        &mut instance,
                        stream,
                        start,
                        None,
                    )?;
                    states.insert(stream.clone(), folded.clone());
                    let added = overlay
                        .lock()
                        .ok()
                        .and_then(|o| o.pending.get(stream).map(|(_, p)| p.len() as u64))
                        .unwrap_or(0);
                    // The page in flight will have written the carried ones: this page expects
                    // the version after them.
                    let own_added = added.saturating_sub(carried_of(stream) as u64);
                    decision
                        .expected
                        .entry(stream.clone())
                        .or_insert(folded.1 - own_added);
                    folded.0
                }
                None => None,
            };
            let outcome = if message.stream.is_command() {
                instance.handle_command(message, state.as_deref())
            } else {
                instance.handle_event(message, state.as_deref())
            }
            .map_err(Decline::Guest)?;
            if *reuse_instances {
                // Only an instance whose every call succeeded is used again.
                reusable = Some(instance);
            }
            Ok(outcome)
        });
        // Emails are the outcome's: those of a handling that failed are dropped with it.
        let emails = overlay
            .lock()
            .map(|mut o| std::mem::take(&mut o.emails))
            .unwrap_or_default();
        let outcome = match decided {
            Ok(outcome) => outcome,
            Err(Decline::Store(e)) => return Err(BatchDecline::Store(e)),
            Err(
                Decline::Guest(GuestError::Transient(_))
                | Decline::Handler(GuestError::Transient(_), _),
            ) => {
                return Err(BatchDecline::OneByOne);
            }
            // The entity it rested on is among the page's checked reads.
            Err(Decline::Guest(e) | Decline::Handler(e, _)) => {
                decision.items.push(BatchItem::Park {
                    message: message.clone(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let checked = match check_outcome(manifest, store.secret(), message, outcome, emails) {
            Ok(checked) => checked,
            Err(reason) => {
                decision.items.push(BatchItem::Park {
                    message: message.clone(),
                    reason: format!("invalid outcome: {reason}"),
                });
                continue;
            }
        };
        let Ok(mut pending) = overlay.lock() else {
            return Err(BatchDecline::OneByOne);
        };
        for (stream, new) in &checked.messages {
            let already_pending = pending
                .pending
                .get(stream)
                .is_some_and(|(_, added)| added.iter().any(|m| m.id == new.id));
            if already_pending {
                continue;
            }
            let (base, added) = match pending.pending.get_mut(stream) {
                Some(entry) => entry,
                None => {
                    // A stream folded in this lane with nothing pending is at the version
                    // folded (a write since fails the commit's expected version).
                    let stored = match (states.get(stream), pending.read_versions.get(stream)) {
                        (Some((_, version)), _) => *version,
                        // The handler decided on what it read there: the write expects it.
                        (None, Some(read)) => {
                            decision.expected.entry(stream.clone()).or_insert(*read);
                            *read
                        }
                        (None, None) => runtime
                            .block_on(store.stream_version(stream))
                            .map_err(BatchDecline::Store)?,
                    };
                    pending
                        .pending
                        .entry(stream.clone())
                        .or_insert((stored, Vec::new()))
                }
            };
            let position = *base + added.len() as u64;
            added.push(Message {
                id: new.id.clone(),
                stream: stream.clone(),
                message_type: new.message_type.clone(),
                data: new.data.clone(),
                metadata: new.metadata.clone(),
                position,
                global_position: 0,
                time_ms: now_ms(),
                not_before_ms: new.not_before_ms,
            });
        }
        for view in &checked.views {
            let row = (view.table.clone(), view.key.clone());
            pending.views.insert(row.clone(), view.value.clone());
            pending.written_here.insert(row.clone());
            own_views.insert(row);
        }
        drop(pending);
        decision.items.push(BatchItem::Decided(checked));
    }
    let Ok(mut overlay) = overlay.lock() else {
        return Err(BatchDecline::OneByOne);
    };
    // What this lane adds, without what it was carried: the next page's carry, and what lanes
    // compare.
    for (stream, (base, added)) in &overlay.pending {
        let carried = carried_of(stream);
        if added.len() > carried {
            decision.writes.pending.insert(
                stream.clone(),
                (base + carried as u64, added[carried..].to_vec()),
            );
        }
    }
    for row in &own_views {
        if let Some(value) = overlay.views.get(row) {
            decision.writes.views.insert(row.clone(), value.clone());
        }
    }
    let mut streams: HashSet<StreamName> = states.into_keys().collect();
    streams.extend(decision.writes.pending.keys().cloned());
    decision.read_rows = std::mem::take(&mut overlay.read_rows);
    // Streams handlers read through the host, at the version read: what the commit checks
    // (an append to one expects it, a stream only read is checked as read).
    for (stream, version) in std::mem::take(&mut overlay.read_versions) {
        decision.expected.entry(stream).or_insert(version);
    }
    Ok(LaneDecision {
        host_reads: std::mem::take(&mut overlay.host_reads),
        decision,
        streams,
        views: own_views,
    })
}

/// Messages and view rows decided by earlier messages of a batch and not yet committed. Later
/// messages of the batch read through it, so they decide on what the batch will have written
/// (the users view, a username claim, the entity's own events).
#[derive(Debug, Default, Clone)]
pub(super) struct Overlay {
    /// Stream → (the version its first pending message goes at, the pending messages): the
    /// stored version when the batch first wrote to it, or where the page in flight's go.
    pub(super) pending: HashMap<StreamName, (u64, Vec<Message>)>,
    pub(super) views: HashMap<(String, String), Option<Value>>,
    /// What handlers read through the host, which may be other entities' streams and rows.
    pub(super) host_reads: HostReads,
    /// Streams read through the host to their end with nothing pending, at the version first
    /// seen: what a write to them expects.
    pub(super) read_versions: HashMap<StreamName, u64>,
    /// View rows read, as first seen, unless this page wrote them first: what the commit
    /// checks.
    pub(super) read_rows: HashMap<(String, String), Option<Value>>,
    /// View rows this page (not the page in flight) wrote.
    pub(super) written_here: HashSet<(String, String)>,
    /// Emails the message being decided asked to deliver, taken into its outcome.
    pub(super) emails: Vec<(String, String)>,
}

/// Streams and view rows handlers read through the host (`read-stream`, `view-get`).
#[derive(Debug, Default, Clone)]
pub(super) struct HostReads {
    pub(super) streams: HashSet<StreamName>,
    pub(super) views: HashSet<(String, String)>,
}

pub(super) type SharedOverlay = Arc<std::sync::Mutex<Overlay>>;

/// A stream as a handler should see it: the stored messages (none read without a store), then
/// those the batch added.
pub(super) fn read_merged(
    runtime: &Handle,
    store: Option<&dyn MessageStore>,
    overlay: Option<&SharedOverlay>,
    stream: &StreamName,
    from: u64,
    limit: usize,
) -> Result<Vec<Message>, StoreError> {
    let stored = match store {
        Some(store) => runtime.block_on(store.read_stream(stream, from, limit))?,
        None => Vec::new(),
    };
    // A read that reached the stream's end saw its version (from 0, an empty read saw 0).
    let seen = stored
        .last()
        .map(|m| m.position + 1)
        .or((from == 0).then_some(0))
        .filter(|_| store.is_some() && stored.len() < limit);
    if let (Some(seen), Some(overlay)) = (seen, overlay)
        && let Ok(mut overlay) = overlay.lock()
        && !overlay.pending.contains_key(stream)
    {
        overlay.read_versions.entry(stream.clone()).or_insert(seen);
    }
    Ok(merge_pending(overlay, stream, from, limit, stored))
}

/// Stored messages of a stream read from `from`, with what the batch added in place of what
/// they would have been.
pub(super) fn merge_pending(
    overlay: Option<&SharedOverlay>,
    stream: &StreamName,
    from: u64,
    limit: usize,
    mut messages: Vec<Message>,
) -> Vec<Message> {
    if let Some(overlay) = overlay
        && let Ok(overlay) = overlay.lock()
        && let Some((base, pending)) = overlay.pending.get(stream)
    {
        messages.retain(|m| m.position < *base);
        messages.extend(pending.iter().filter(|m| m.position >= from).cloned());
        messages.truncate(limit);
    }
    messages
}

#[cfg(test)]
mod tests;

/// True when a page's commit stored its writes where the next page, decided on top of them,
/// expected them: each stream's messages at the carried base, none dropped as a duplicate.
pub(super) fn stored_as_carried(writes: &Overlay, committed: &Committed) -> bool {
    if !committed.duplicates.is_empty() {
        return false;
    }
    // One pass over what was written: each stream's first position and count.
    let mut stored: HashMap<&StreamName, (u64, usize)> = HashMap::new();
    for message in &committed.written {
        stored
            .entry(&message.stream)
            .or_insert((message.position, 0))
            .1 += 1;
    }
    writes.pending.iter().all(|(stream, (base, carried))| {
        stored.get(stream).copied().unwrap_or((*base, 0)) == (*base, carried.len())
    })
}
