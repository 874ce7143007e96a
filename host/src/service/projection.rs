//! Projections: folding an entity's stream through the guest's `project` (`fold`), the
//! per-version `ProjectionCache` the folds start from and the snapshots they take, the first
//! pages of a lane's entities read at once (`prefetch_entities`), and `project` as `ferry
//! project` shows it.
//!
//! Snapshots keep a fold after a restart cheap: a fold over stored events that passes a multiple
//! of [`SNAPSHOT_EVERY`] events leaves the state it reached in the cache's due list, and the
//! consumer's next commit stores it. A fold whose first page is full (a long stream the cache
//! does not hold) looks for the stream's snapshot of this component version and starts there.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::Context as _;
use futures_util::{StreamExt as _, TryStreamExt as _};
use tokio::runtime::Handle;

use super::decide::{Decline, SharedOverlay, entity_of, merge_pending, read_merged};
use super::host_imports::StoreHost;
use super::record_projected;
use crate::store::{Message, MessageStore, Snapshot, StoreError, StreamName};
use crate::wasm::ServiceComponent;

/// Messages of a stream read per request while projecting.
const READ_BATCH: usize = 256;
/// Entity reads a lane sends at once before deciding.
const PREFETCH_IN_FLIGHT: usize = 32;
/// Events between two snapshots of a stream: a fold after a restart projects at most about this
/// many events (a few ms of guest calls), and a stream of N events stores N / this snapshots.
pub const SNAPSHOT_EVERY: u64 = 1000;
/// A larger state is not kept as a snapshot: it would be a large write every
/// [`SNAPSHOT_EVERY`] events (and past what one JetStream message may hold).
const MAX_SNAPSHOT_BYTES: usize = 256 * 1024;

/// Projected states of one component version, by stream: `(version, state)`. A stream only grows,
/// so the state at a version never changes; a later fold starts from it and reads only the new
/// events. One cache per component version, so new code never sees states folded by old code.
/// Bounded: when full it is emptied (a refold costs one pass over each stream).
#[derive(Debug, Default)]
pub struct ProjectionCache {
    entries: std::sync::Mutex<HashMap<StreamName, (u64, Option<String>)>>,
    /// The content hash of the component version whose states these are.
    component: String,
    /// Snapshots folds took since a commit last carried them away.
    due: std::sync::Mutex<Vec<Snapshot>>,
}

/// Streams whose state one service keeps folded.
const PROJECTION_CACHE_STREAMS: usize = 10_000;

impl ProjectionCache {
    /// The cache of the component version with this content hash.
    pub fn new(component: &str) -> Self {
        Self {
            component: component.to_owned(),
            ..Self::default()
        }
    }

    /// The snapshots taken since the last call, for the next commit to store.
    pub(super) fn take_due_snapshots(&self) -> Vec<Snapshot> {
        self.due
            .lock()
            .map(|mut due| std::mem::take(&mut *due))
            .unwrap_or_default()
    }

    /// Keeps a stored fold's state as a snapshot when the fold passed a multiple of
    /// [`SNAPSHOT_EVERY`] events since `from`.
    fn snapshot_if_due(&self, stream: &StreamName, from: u64, (state, version): &Folded) {
        let Some(state) = state else { return };
        if version / SNAPSHOT_EVERY == from / SNAPSHOT_EVERY
            || state.len() > MAX_SNAPSHOT_BYTES
            || self.component.is_empty()
        {
            return;
        }
        if let Ok(mut due) = self.due.lock() {
            // A later fold of the same stream supersedes one not yet stored.
            due.retain(|snapshot| &snapshot.stream != stream);
            due.push(Snapshot {
                stream: stream.clone(),
                component: self.component.clone(),
                version: *version,
                state: state.clone(),
            });
        }
    }

    pub(super) fn get(&self, stream: &StreamName) -> (Option<String>, u64) {
        self.entries
            .lock()
            .ok()
            .and_then(|entries| entries.get(stream).cloned())
            .map(|(version, state)| (state, version))
            .unwrap_or((None, 0))
    }

    pub(super) fn put(&self, stream: &StreamName, version: u64, state: &Option<String>) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= PROJECTION_CACHE_STREAMS && !entries.contains_key(stream) {
                entries.clear();
            }
            let newer = entries
                .get(stream)
                .is_none_or(|(cached, _)| *cached < version);
            if newer {
                entries.insert(stream.clone(), (version, state.clone()));
            }
        }
    }
}

/// A stream's state folded by `project` (none for an empty stream) and the version it is at.
pub(super) type Folded = (Option<String>, u64);

/// Folds a stream through an instance's `project`, from a known `(state, version)`; returns the
/// state (none for an empty stream) and the stream's version. Without a store, only what the
/// overlay has pending is folded. With `snapshots` (a fold of stored events only), a long stream
/// starts from its snapshot when that is further on, and a fold that passes a snapshot point
/// leaves its state due for the next commit.
#[allow(clippy::too_many_arguments)]
pub(super) fn fold(
    runtime: &Handle,
    store: Option<&dyn MessageStore>,
    overlay: Option<&SharedOverlay>,
    snapshots: Option<&ProjectionCache>,
    instance: &mut crate::wasm::GuestInstance,
    stream: &StreamName,
    (mut state, mut version): Folded,
    mut first_page: Option<Vec<Message>>,
) -> Result<Folded, Decline> {
    let mut from = version;
    let mut looked = false;
    loop {
        let page = match first_page.take() {
            Some(stored) => merge_pending(overlay, stream, version, READ_BATCH, stored),
            None => read_merged(runtime, store, overlay, stream, version, READ_BATCH)
                .map_err(Decline::Store)?,
        };
        // A full first page: a long stream, worth one read for its snapshot.
        if !looked
            && page.len() == READ_BATCH
            && let (Some(cache), Some(store)) = (snapshots, store)
        {
            looked = true;
            let snapshot = runtime
                .block_on(store.snapshot(stream, &cache.component))
                .map_err(Decline::Store)?;
            if let Some(snapshot) = snapshot.filter(|s| s.version > version + READ_BATCH as u64) {
                (state, version, from) = (Some(snapshot.state), snapshot.version, snapshot.version);
                continue;
            }
        }
        (state, version) = project_all(instance, &page, state, version)?;
        if page.len() < READ_BATCH {
            let folded = (state, version);
            if let Some(cache) = snapshots {
                cache.snapshot_if_due(stream, from, &folded);
            }
            return Ok(folded);
        }
    }
}

fn project_all(
    instance: &mut crate::wasm::GuestInstance,
    events: &[Message],
    mut state: Option<String>,
    mut version: u64,
) -> Result<(Option<String>, u64), Decline> {
    for event in events {
        state = Some(
            instance
                .project(state.as_deref(), event)
                .map_err(Decline::Guest)?,
        );
        version = event.position + 1;
    }
    if !events.is_empty() {
        record_projected(instance.service(), events.len() as u64);
    }
    Ok((state, version))
}

/// A stream projected as `ferry project` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projected {
    pub state: Option<String>,
    pub version: u64,
    /// The version of the snapshot the fold started from, when it found one.
    pub snapshot: Option<u64>,
}

/// Projects a stream with a service's component, as `ferry project` shows it: from the stream's
/// snapshot of that component version when there is one.
pub async fn project(
    component: Arc<ServiceComponent>,
    store: Arc<dyn MessageStore>,
    stream: StreamName,
) -> anyhow::Result<Projected> {
    let runtime = Handle::current();
    let snapshot = store.snapshot(&stream, component.hash()).await?;
    let snapshot_version = snapshot.as_ref().map(|s| s.version);
    let start = snapshot.map_or((None, 0), |s| (Some(s.state), s.version));
    tokio::task::spawn_blocking(move || {
        let host = StoreHost::for_projection(
            runtime.clone(),
            store.clone(),
            component.manifest().name.clone(),
        );
        let mut instance = component.instantiate(Box::new(host))?;
        let (state, version) = fold(
            &runtime,
            Some(store.as_ref()),
            None,
            None,
            &mut instance,
            &stream,
            start,
            None,
        )
        .map_err(|e| match e {
            Decline::Guest(e) | Decline::Handler(e, _) => anyhow::Error::new(e),
            Decline::Store(e) => anyhow::Error::new(e),
        })?;
        Ok(Projected {
            state,
            version,
            snapshot: snapshot_version,
        })
    })
    .await
    .context("the projection thread failed")?
}

/// The first page of each entity a lane will fold, read from the store at once (concurrently:
/// on JetStream each read is a round trip), with the cached projection it continues.
pub(super) fn prefetch_entities(
    runtime: &Handle,
    projections: &ProjectionCache,
    store: &dyn MessageStore,
    service: &str,
    messages: &[&Message],
) -> Result<HashMap<StreamName, (Folded, Vec<Message>)>, StoreError> {
    let entities: HashSet<StreamName> = messages
        .iter()
        .filter_map(|message| entity_of(service, message))
        .collect();
    let reads = entities.into_iter().map(|entity| async move {
        let start = projections.get(&entity);
        let page = store.read_stream(&entity, start.1, READ_BATCH).await?;
        Ok::<_, StoreError>((entity, (start, page)))
    });
    runtime.block_on(
        futures_util::stream::iter(reads)
            .buffer_unordered(PREFETCH_IN_FLIGHT)
            .try_collect(),
    )
}

#[cfg(test)]
mod tests;
