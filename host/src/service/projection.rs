//! Projections: folding an entity's stream through the guest's `project` (`fold`), the
//! per-version `ProjectionCache` the folds start from, the first pages of a lane's entities read
//! at once (`prefetch_entities`), and `project` as `ferry project` shows it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::Context as _;
use futures_util::{StreamExt as _, TryStreamExt as _};
use tokio::runtime::Handle;

use super::decide::{Decline, SharedOverlay, entity_of, merge_pending, read_merged};
use super::host_imports::StoreHost;
use super::record_projected;
use crate::store::{Message, MessageStore, StoreError, StreamName};
use crate::wasm::ServiceComponent;

/// Messages of a stream read per request while projecting.
const READ_BATCH: usize = 256;
/// Entity reads a lane sends at once before deciding.
const PREFETCH_IN_FLIGHT: usize = 32;

/// Projected states of one component version, by stream: `(version, state)`. A stream only grows,
/// so the state at a version never changes; a later fold starts from it and reads only the new
/// events. One cache per component version, so new code never sees states folded by old code.
/// Bounded: when full it is emptied (a refold costs one pass over each stream).
#[derive(Debug, Default)]
pub struct ProjectionCache {
    entries: std::sync::Mutex<HashMap<StreamName, (u64, Option<String>)>>,
}

/// Streams whose state one service keeps folded.
const PROJECTION_CACHE_STREAMS: usize = 10_000;

impl ProjectionCache {
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
/// overlay has pending is folded.
pub(super) fn fold(
    runtime: &Handle,
    store: Option<&dyn MessageStore>,
    overlay: Option<&SharedOverlay>,
    instance: &mut crate::wasm::GuestInstance,
    stream: &StreamName,
    (mut state, mut version): Folded,
    mut first_page: Option<Vec<Message>>,
) -> Result<Folded, Decline> {
    loop {
        let page = match first_page.take() {
            Some(stored) => merge_pending(overlay, stream, version, READ_BATCH, stored),
            None => read_merged(runtime, store, overlay, stream, version, READ_BATCH)
                .map_err(Decline::Store)?,
        };
        (state, version) = project_all(instance, &page, state, version)?;
        if page.len() < READ_BATCH {
            return Ok((state, version));
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

/// Projects a stream with a service's component, as `ferry project` shows it.
pub async fn project(
    component: Arc<ServiceComponent>,
    store: Arc<dyn MessageStore>,
    stream: StreamName,
) -> anyhow::Result<(Option<String>, u64)> {
    let runtime = Handle::current();
    tokio::task::spawn_blocking(move || {
        let host = StoreHost {
            runtime: runtime.clone(),
            store: store.clone(),
            service: component.manifest().name.clone(),
            handled_id: String::new(),
            mail: None,
            overlay: None,
        };
        let mut instance = component.instantiate(Box::new(host))?;
        fold(
            &runtime,
            Some(store.as_ref()),
            None,
            &mut instance,
            &stream,
            (None, 0),
            None,
        )
        .map_err(|e| match e {
            Decline::Guest(e) => anyhow::Error::new(e),
            Decline::Store(e) => anyhow::Error::new(e),
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
