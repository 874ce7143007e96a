//! A store that records what is written through it: the messages each commit appended and the
//! view rows it wrote, once recording is switched on. `ferry test` wraps its throwaway store in
//! one, so a scenario sees exactly what the handling of its `when` message wrote.
//!
//! It also answers with the scenarios' namespace secret, a published one: the ids and secrets
//! a handler derives are then the same on every machine and every run, so a scenario can name
//! them. No store that serves clients has it.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::store::{
    Category, CategoryFilter, CategoryPage, Commit, Committed, ConsumerId, ConsumerInfo,
    DeferredMessage, Group, GroupSpec, Leases, Message, MessageStore, NamespaceSecret,
    ParkedMessage, Snapshot, StoreError, StreamName, ViewRow, ViewWrite,
};

#[derive(Default)]
struct Recorded {
    on: bool,
    written: Vec<Message>,
    views: Vec<ViewWrite>,
}

/// Delegates everything to `inner`; records successful commits while on.
pub(super) struct RecordingStore {
    inner: Arc<dyn MessageStore>,
    recorded: Mutex<Recorded>,
    secret: NamespaceSecret,
}

impl RecordingStore {
    pub fn new(inner: Arc<dyn MessageStore>) -> Self {
        Self {
            inner,
            recorded: Mutex::default(),
            secret: NamespaceSecret::published(),
        }
    }

    /// Records the commits from now on.
    pub fn start(&self) {
        if let Ok(mut recorded) = self.recorded.lock() {
            recorded.on = true;
        }
    }

    /// The messages written and view rows changed since [`start`](Self::start).
    pub fn taken(&self) -> (Vec<Message>, Vec<ViewWrite>) {
        self.recorded
            .lock()
            .map(|mut r| (std::mem::take(&mut r.written), std::mem::take(&mut r.views)))
            .unwrap_or_default()
    }
}

#[async_trait]
impl MessageStore for RecordingStore {
    async fn commit(&self, commit: Commit) -> Result<Committed, StoreError> {
        let views = commit.views.clone();
        let committed = self.inner.commit(commit).await?;
        if let Ok(mut recorded) = self.recorded.lock()
            && recorded.on
        {
            recorded.written.extend(committed.written.iter().cloned());
            recorded.views.extend(views);
        }
        Ok(committed)
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        from_position: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.inner.read_stream(stream, from_position, limit).await
    }

    async fn stream_version(&self, stream: &StreamName) -> Result<u64, StoreError> {
        self.inner.stream_version(stream).await
    }

    fn secret(&self) -> &NamespaceSecret {
        &self.secret
    }

    fn degraded(&self) -> Option<String> {
        self.inner.degraded()
    }

    async fn read_category(
        &self,
        category: &Category,
        after: u64,
        filter: &CategoryFilter,
        limit: usize,
    ) -> Result<CategoryPage, StoreError> {
        self.inner
            .read_category(category, after, filter, limit)
            .await
    }

    async fn watch(
        &self,
        consumer: &ConsumerId,
    ) -> Result<tokio::sync::watch::Receiver<u64>, StoreError> {
        self.inner.watch(consumer).await
    }

    fn batch_size(&self) -> usize {
        self.inner.batch_size()
    }

    async fn message(&self, id: &str) -> Result<Option<Message>, StoreError> {
        self.inner.message(id).await
    }

    async fn seal_key(&self, message_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.seal_key(message_id).await
    }

    async fn snapshot(
        &self,
        stream: &StreamName,
        component: &str,
    ) -> Result<Option<Snapshot>, StoreError> {
        self.inner.snapshot(stream, component).await
    }

    async fn head(&self) -> Result<u64, StoreError> {
        self.inner.head().await
    }

    async fn join_group(
        &self,
        consumer: &ConsumerId,
        spec: GroupSpec,
    ) -> Result<Group, StoreError> {
        self.inner.join_group(consumer, spec).await
    }

    async fn group(&self, consumer: &ConsumerId) -> Result<Option<Group>, StoreError> {
        self.inner.group(consumer).await
    }

    async fn settled(&self, consumer: &ConsumerId) -> Result<u64, StoreError> {
        self.inner.settled(consumer).await
    }

    fn leases(&self) -> Option<&dyn Leases> {
        self.inner.leases()
    }

    async fn consumers(
        &self,
        category: Option<&Category>,
    ) -> Result<Vec<ConsumerInfo>, StoreError> {
        self.inner.consumers(category).await
    }

    async fn view_get(&self, table: &str, key: &str) -> Result<Option<ViewRow>, StoreError> {
        self.inner.view_get(table, key).await
    }

    async fn view_rows(
        &self,
        table: &str,
        after_key: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, ViewRow)>, StoreError> {
        self.inner.view_rows(table, after_key, limit).await
    }

    async fn parked(
        &self,
        consumer: Option<&ConsumerId>,
    ) -> Result<Vec<ParkedMessage>, StoreError> {
        self.inner.parked(consumer).await
    }

    async fn deferred(&self, consumer: &ConsumerId) -> Result<Vec<DeferredMessage>, StoreError> {
        self.inner.deferred(consumer).await
    }

    async fn rebuild_views(
        &self,
        tables: &[String],
        consumers: &[ConsumerId],
    ) -> Result<u64, StoreError> {
        self.inner.rebuild_views(tables, consumers).await
    }

    async fn replay(
        &self,
        message_id: Option<&str>,
        consumer: Option<&ConsumerId>,
    ) -> Result<usize, StoreError> {
        self.inner.replay(message_id, consumer).await
    }
}
