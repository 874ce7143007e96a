//! The service runner: turns loaded components into running durable consumers.
//!
//! For each service it runs one consumer on its command category (when the manifest says it
//! handles commands) and one per subscribed event category. For every delivered message it folds
//! the concerned entity's stream through the guest's `project`, calls the handler in a fresh
//! instance, checks the outcome, and commits the outcome together with the consumer's new position.
//! Transient failures are retried with backoff in place (keeping the entity's order); permanent
//! failures, traps, timeouts, invalid outcomes and messages past the maximum number of deliveries
//! are parked and the consumer moves on. Messages whose not-before time lies ahead are deferred.
//! A sealed command (see `seal`) is handled one by one: its handler sees the fields in clear, the
//! commit that settles it shreds their key, and a parked one keeps its key for a replay.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{StreamExt as _, TryStreamExt as _};
use serde_json::{Map, Value};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::mail::Maildir;
use crate::seal;
use crate::store::{
    Category, Commit, Committed, ConsumerId, DeferredMessage, Message, MessageStore, NewMessage,
    ParkedMessage, Settle, StoreError, StreamAppend, StreamName, ViewWrite, now_ms,
    validate_table_name,
};
use crate::wasm::{GuestError, GuestHost, Outcome, ServiceComponent};

/// Upper bounds on what one outcome may hold.
const MAX_OUTCOME_MESSAGES: usize = 1000;
const MAX_OUTCOME_BYTES: usize = 4 * 1024 * 1024;
/// How often an outcome is recomputed on fresh state after an expected-version conflict.
const CONFLICT_RETRIES: u32 = 10;
/// Messages of a stream read per request while projecting.
const READ_BATCH: usize = 256;
/// Entity reads a lane sends at once before deciding.
const PREFETCH_IN_FLIGHT: usize = 32;
/// The fewest messages of a page worth a decide lane of their own.
const MESSAGES_PER_LANE: usize = 8;
/// Namespace of the deterministic ids Ferry derives (a fixed, random UUID).
const ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6a0f_9a7e_52c4_4f0e_9c1e_2b7d_f1a3_c5e9);

/// How consumers retry.
#[derive(Debug, Clone, Copy)]
pub struct RunnerConfig {
    /// Deliveries of a message that fails transiently before it is parked.
    pub max_deliveries: u32,
    /// First retry delay; doubles per delivery.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Handle the messages of a batch in one instance while it stays healthy, instead of a fresh
    /// instance per message (cheaper; a guest can then keep state between messages, so only for
    /// guests that do not). An instance is never used again after a failure.
    pub reuse_instances: bool,
    /// Threads on which the entities of one page are decided at the same time (in order within
    /// each entity); 1 decides a page in order on one thread.
    pub decide_lanes: usize,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            max_deliveries: 5,
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
            reuse_instances: false,
            decide_lanes: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
        }
    }
}

/// Host capabilities beyond the store, and who may use them.
#[derive(Debug, Clone, Default)]
pub struct Capabilities {
    /// Where granted services deliver email.
    pub maildir: Option<Arc<Maildir>>,
    /// Services granted the `mail` capability.
    pub mail_grants: Vec<String>,
}

impl Capabilities {
    fn mail_for(&self, service: &str) -> Option<Arc<Maildir>> {
        self.maildir
            .clone()
            .filter(|_| self.mail_grants.iter().any(|granted| granted == service))
    }
}

/// The consumer name a service uses on every category it reads, as in the article.
pub fn consumer_name(service: &str) -> String {
    format!("microservice:{service}")
}

/// A deterministic id: the same inputs always give the same UUID.
pub fn derived_id(parts: &[&str]) -> String {
    uuid::Uuid::new_v5(&ID_NAMESPACE, parts.join("\u{1f}").as_bytes()).to_string()
}

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
    fn get(&self, stream: &StreamName) -> (Option<String>, u64) {
        self.entries
            .lock()
            .ok()
            .and_then(|entries| entries.get(stream).cloned())
            .map(|(version, state)| (state, version))
            .unwrap_or((None, 0))
    }

    fn put(&self, stream: &StreamName, version: u64, state: &Option<String>) {
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

/// Components that cannot run, each with the reason.
pub type Refused = Vec<(PathBuf, anyhow::Error)>;

/// A component read from the services folder.
#[derive(Debug, Clone)]
pub struct LoadedService {
    pub path: PathBuf,
    pub component: ServiceComponent,
}

/// Checks that a set of components can run together: valid names, one service per name (so one
/// consumer per command category), valid subscriptions and view names. Returns the usable ones and
/// a clear reason for each refused one.
pub fn admit(candidates: Vec<LoadedService>) -> (Vec<LoadedService>, Refused) {
    let mut admitted: Vec<LoadedService> = Vec::new();
    let mut refused = Vec::new();
    for candidate in candidates {
        match check_manifest(&candidate.component)
            .and_then(|()| check_unique(&admitted, &candidate))
        {
            Ok(()) => admitted.push(candidate),
            Err(e) => refused.push((candidate.path, e)),
        }
    }
    (admitted, refused)
}

fn check_manifest(component: &ServiceComponent) -> anyhow::Result<()> {
    let manifest = component.manifest();
    Category::events_of(&manifest.name).context("the manifest's service name")?;
    for subscription in &manifest.subscriptions {
        let category =
            Category::parse(&subscription.category).context("a subscription in the manifest")?;
        anyhow::ensure!(
            !category.is_command(),
            "service {} subscribes to the command category {category}; a command category is \
             consumed only by its own service (set handles-commands instead)",
            manifest.name
        );
    }
    for view in &manifest.views {
        validate_table_name(view).context("a view in the manifest")?;
    }
    Ok(())
}

fn check_unique(admitted: &[LoadedService], candidate: &LoadedService) -> anyhow::Result<()> {
    let name = &candidate.component.manifest().name;
    if let Some(other) = admitted
        .iter()
        .find(|a| &a.component.manifest().name == name)
    {
        anyhow::bail!(
            "service {name} is already provided by {}; only one service may consume {name}:command",
            other.path.display()
        );
    }
    for view in &candidate.component.manifest().views {
        if let Some(other) = admitted
            .iter()
            .find(|a| a.component.manifest().views.contains(view))
        {
            anyhow::bail!(
                "view {view} is already written by service {} ({}); a view has one writer",
                other.component.manifest().name,
                other.path.display()
            );
        }
    }
    Ok(())
}

/// Loads every `*.wasm` file of a folder, in file name order. Components that fail to load come
/// back as errors beside the loaded ones.
pub fn load_folder(
    runtime: &crate::wasm::Runtime,
    folder: &Path,
    limits: crate::wasm::Limits,
) -> anyhow::Result<(Vec<LoadedService>, Refused)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(folder)
        .with_context(|| format!("cannot read the services folder {}", folder.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm"))
        .collect();
    paths.sort();
    let mut loaded = Vec::new();
    let mut failed = Vec::new();
    for path in paths {
        match runtime.load_file(&path, limits) {
            Ok(component) => loaded.push(LoadedService { path, component }),
            Err(e) => failed.push((path, anyhow::Error::new(e))),
        }
    }
    Ok((loaded, failed))
}

/// Counters per service since the host started, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceMetrics {
    /// Messages handled to a committed outcome.
    pub handled: u64,
    /// Messages parked.
    pub parked: u64,
    /// Time spent deciding (guest calls and their reads) and committing, in seconds.
    pub handling_seconds: f64,
    /// Events passed through `project`: with the projection cache, at most about two per event
    /// written (pending in its batch, then from the store), not one per event per message. Every
    /// call counts, also those of lane work that was dropped and decided again on one thread.
    pub projected_events: u64,
}

static METRICS: std::sync::LazyLock<std::sync::Mutex<HashMap<String, ServiceMetrics>>> =
    std::sync::LazyLock::new(Default::default);

/// The counters of every service that handled something in this process.
pub fn metrics() -> HashMap<String, ServiceMetrics> {
    METRICS.lock().map(|m| m.clone()).unwrap_or_default()
}

fn record(service: &str, handled: u64, parked: u64, elapsed: Duration) {
    if let Ok(mut all) = METRICS.lock() {
        let entry = all.entry(service.to_owned()).or_default();
        entry.handled += handled;
        entry.parked += parked;
        entry.handling_seconds += elapsed.as_secs_f64();
    }
}

fn record_projected(service: &str, events: u64) {
    if let Ok(mut all) = METRICS.lock() {
        all.entry(service.to_owned()).or_default().projected_events += events;
    }
}

/// A running service as listed: which version runs, from where, since when.
#[derive(Debug, Clone)]
pub struct ServiceInfo {
    pub name: String,
    pub path: PathBuf,
    pub component: Arc<ServiceComponent>,
    /// When this version started, in ms since the Unix epoch.
    pub since_ms: u64,
}

/// The services a host runs, shared with the control requests that need a component (`project`,
/// `rebuild`, `services`); a reload changes it.
#[derive(Debug, Clone, Default)]
pub struct ServiceTable(Arc<std::sync::RwLock<Vec<ServiceInfo>>>);

impl ServiceTable {
    /// A table of components that are loaded but not running (the CLI without a host).
    pub fn of(services: &[LoadedService]) -> Self {
        let table = Self::default();
        for service in services {
            table.put(ServiceInfo {
                name: service.component.manifest().name.clone(),
                path: service.path.clone(),
                component: Arc::new(service.component.clone()),
                since_ms: now_ms(),
            });
        }
        table
    }

    /// The component of a service.
    pub fn get(&self, name: &str) -> Option<Arc<ServiceComponent>> {
        self.list()
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| s.component)
    }

    /// Every service, by name.
    pub fn list(&self) -> Vec<ServiceInfo> {
        let mut list = self.0.read().map(|l| l.clone()).unwrap_or_default();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    fn put(&self, info: ServiceInfo) {
        if let Ok(mut list) = self.0.write() {
            list.retain(|s| s.name != info.name);
            list.push(info);
        }
    }

    fn remove(&self, name: &str) {
        if let Ok(mut list) = self.0.write() {
            list.retain(|s| s.name != name);
        }
    }
}

/// Running services, each with its consumers; services can be added, replaced and stopped while
/// the others run. Dropping it without [`Running::shutdown`] aborts the consumers.
pub struct Running {
    store: Arc<dyn MessageStore>,
    config: RunnerConfig,
    capabilities: Capabilities,
    /// False for a rebuild: only event subscriptions run.
    with_commands: bool,
    services: HashMap<String, ServiceRun>,
    table: ServiceTable,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The consumers of one service version.
struct ServiceRun {
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Running {
    /// Starts the consumers of every service.
    pub fn start(
        store: Arc<dyn MessageStore>,
        services: &[LoadedService],
        config: RunnerConfig,
        capabilities: &Capabilities,
    ) -> anyhow::Result<Self> {
        let mut running = Self::empty(store, config, capabilities, true);
        for service in services {
            running.add(service)?;
        }
        Ok(running)
    }

    /// Starts only a service's event subscriptions (not its command consumer): what a view
    /// rebuild needs, with nothing else happening.
    pub fn start_subscriptions(
        store: Arc<dyn MessageStore>,
        service: &LoadedService,
        config: RunnerConfig,
        capabilities: &Capabilities,
    ) -> anyhow::Result<Self> {
        let mut running = Self::empty(store, config, capabilities, false);
        running.add(service)?;
        Ok(running)
    }

    fn empty(
        store: Arc<dyn MessageStore>,
        config: RunnerConfig,
        capabilities: &Capabilities,
        with_commands: bool,
    ) -> Self {
        Self {
            store,
            config,
            capabilities: capabilities.clone(),
            with_commands,
            services: HashMap::new(),
            table: ServiceTable::default(),
        }
    }

    /// The table of running services, kept up to date.
    pub fn table(&self) -> ServiceTable {
        self.table.clone()
    }

    /// Starts a service's consumers. A service of that name must not be running.
    pub fn add(&mut self, service: &LoadedService) -> anyhow::Result<()> {
        let manifest = service.component.manifest();
        anyhow::ensure!(
            !self.services.contains_key(&manifest.name),
            "service {} is already running",
            manifest.name
        );
        let component = Arc::new(service.component.clone());
        // Per version: new code never sees states folded by old code.
        let projections = Arc::new(ProjectionCache::default());
        let mut consumers = subscriptions_of(&service.component)?;
        if self.with_commands && manifest.handles_commands {
            let id = ConsumerId::new(
                Category::commands_of(&manifest.name)?,
                consumer_name(&manifest.name),
            );
            consumers.insert(0, (id, None));
        }
        tracing::info!(
            service = %manifest.name,
            version = %&component.hash()[..12],
            path = %service.path.display(),
            consumers = consumers.len(),
            "service started"
        );
        let shutdown = watch::channel(false).0;
        let mut tasks = JoinSet::new();
        for (id, origin_prefix) in consumers {
            let consumer = Consumer {
                id,
                position: 0,
                origin_prefix,
                mail: self.capabilities.mail_for(&manifest.name),
                component: component.clone(),
                projections: projections.clone(),
                store: self.store.clone(),
                config: self.config,
                lanes: self.config.decide_lanes.max(1),
                shutdown: shutdown.subscribe(),
            };
            tasks.spawn(consumer.run());
        }
        self.services
            .insert(manifest.name.clone(), ServiceRun { shutdown, tasks });
        self.table.put(ServiceInfo {
            name: manifest.name.clone(),
            path: service.path.clone(),
            component,
            since_ms: now_ms(),
        });
        Ok(())
    }

    /// Stops a service's consumers between two messages (the message in flight finishes) and
    /// waits for them. Their positions stay in the store. False when it was not running.
    pub async fn stop(&mut self, name: &str) -> bool {
        let Some(mut run) = self.services.remove(name) else {
            return false;
        };
        let _ = run.shutdown.send(true);
        while run.tasks.join_next().await.is_some() {}
        self.table.remove(name);
        tracing::info!(service = %name, "service stopped");
        true
    }

    /// Stops every consumer between two messages and waits for them.
    pub async fn shutdown(mut self) {
        let names: Vec<String> = self.services.keys().cloned().collect();
        for run in self.services.values() {
            let _ = run.shutdown.send(true);
        }
        for name in names {
            self.stop(&name).await;
        }
    }
}

/// Where a handled message came from, which decides how it is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Category,
    Deferred,
}

struct Consumer {
    id: ConsumerId,
    /// The stored position as this consumer last read or wrote it.
    position: u64,
    origin_prefix: Option<String>,
    mail: Option<Arc<Maildir>>,
    component: Arc<ServiceComponent>,
    projections: Arc<ProjectionCache>,
    store: Arc<dyn MessageStore>,
    config: RunnerConfig,
    /// Threads a page's entities are decided on; drops to 1 when this service's handlers are
    /// seen to read or write across entities.
    lanes: usize,
    shutdown: watch::Receiver<bool>,
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
    /// Taken when it is sent.
    commit: Option<Commit>,
    parked: u64,
    /// What it writes, for the next page to be decided on top of.
    writes: Arc<Overlay>,
    lanes_met: bool,
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

    async fn run(mut self) {
        tracing::debug!(consumer = %self.id, "consumer started");
        loop {
            match self.poll().await {
                Ok(()) => {}
                Err(Interrupted::Shutdown) => break,
                Err(Interrupted::Moved) => {
                    tracing::info!(consumer = %self.id, "position moved by someone else; reading again");
                }
                Err(Interrupted::Store(e)) => {
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
        let mut next_due = None;
        for deferred in self.store.deferred(&self.id).await? {
            if deferred.due_ms > now_ms() {
                next_due = Some(deferred.due_ms);
                break;
            }
            self.handle(deferred.message, Source::Deferred).await?;
        }

        self.position = self.store.consumer_position(&self.id).await?;
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
            () = wait_for_due => Ok(()),
            _ = self.shutdown.changed() => Err(Interrupted::Shutdown),
        }
    }

    /// Handles the category's pages from the stored position; true when it ran out of messages,
    /// false when it stopped to let deferred messages in.
    ///
    /// Pages are pipelined: while a page's commit is in flight, the next page is read and decided
    /// on top of what the page in flight writes (its messages and view rows carried into the next
    /// page's overlay), so deciding overlaps the store's flush or round trip. The next page is
    /// kept only if the page in flight was committed; its commit advances the position from where
    /// that page ended, so it can never land without it. A service with the mail capability is
    /// not pipelined: nothing is delivered on the strength of a commit that might fail.
    async fn handle_category(&mut self) -> Result<bool, Interrupted> {
        let began = std::time::Instant::now();
        let overlap = self.mail.is_none();
        let mut in_flight: Option<Box<DecidedPage>> = None;
        loop {
            let reading = began.elapsed() < KEEP_READING_FOR && !*self.shutdown.borrow();
            if !reading && in_flight.is_none() {
                return Ok(false);
            }
            let sending = in_flight.as_mut().and_then(|page| page.commit.take());
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
                    Err(
                        StoreError::Conflict { .. }
                        | StoreError::Duplicate { .. }
                        | StoreError::Name(_)
                        | StoreError::InvalidMessage { .. }
                        | StoreError::TooLarge { .. },
                    ) => {
                        // The page goes one by one; the next page, decided on top of it, is
                        // dropped and read again.
                        self.one_by_one(&page.messages).await?;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            match next.transpose()? {
                None => {}
                Some(NextPage::Idle { scanned_to }) => {
                    if scanned_to > self.position {
                        // Everything scanned was filtered out: remember that, so a restart
                        // does not rescan.
                        self.settle_only(Settle::Advance {
                            consumer: self.id.clone(),
                            from: self.position,
                            to: scanned_to,
                        })
                        .await?;
                        self.position = scanned_to;
                    }
                    return Ok(true);
                }
                Some(NextPage::OneByOne(messages)) => self.one_by_one(&messages).await?,
                Some(NextPage::Decided(page)) => {
                    if page.lanes_met {
                        tracing::debug!(consumer = %self.id, "handlers read or wrote across entities: deciding pages on one thread");
                        self.lanes = 1;
                    }
                    in_flight = Some(page);
                }
            }
        }
    }

    /// Handles messages one at a time, each with its own commit.
    async fn one_by_one(&mut self, messages: &[Message]) -> Result<(), Interrupted> {
        for message in messages {
            let global = message.global_position;
            self.handle(message.clone(), Source::Category).await?;
            self.position = global;
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
                self.origin_prefix.as_deref(),
                self.store.batch_size(),
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
            mail: self.mail.clone(),
            reuse_instances: self.config.reuse_instances,
        };
        // A lane costs a thread hand-off and reads of its own: a small page (a consumer keeping
        // up with a steady load) is decided faster on fewer lanes.
        let lanes = self.lanes.min(messages.len() / MESSAGES_PER_LANE).max(1);
        let decision = match decide_batch(decider, messages.clone(), carry, lanes).await {
            Ok(decision) => decision,
            Err(BatchDecline::OneByOne) => return Ok(NextPage::OneByOne(messages)),
            Err(BatchDecline::Store(e)) => return Err(e.into()),
        };
        let mut commit = Commit {
            settle: Some(Settle::Advance {
                consumer: self.id.clone(),
                from,
                to: last,
            }),
            ..Commit::default()
        };
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
                        reason,
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
        // A message whose id is stored (the outcome of a replayed message) would be dropped, and
        // later messages of the page must not have seen it: the store refuses such a page,
        // which then goes one by one.
        commit.refuse_duplicates = true;
        Ok(NextPage::Decided(Box::new(DecidedPage {
            messages,
            last,
            commit: Some(commit),
            parked,
            writes: Arc::new(decision.writes),
            lanes_met: decision.lanes_met,
            started,
        })))
    }

    /// What follows a page's commit: the position, metrics, and the states worth caching.
    fn page_stored(&mut self, page: Box<DecidedPage>, committed: &Committed) {
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

    fn settle(&self, message: &Message, source: Source) -> Settle {
        match source {
            Source::Category => Settle::Advance {
                consumer: self.id.clone(),
                from: self.position,
                to: message.global_position,
            },
            Source::Deferred => Settle::ClearDeferred {
                consumer: self.id.clone(),
                global_position: message.global_position,
            },
        }
    }

    async fn settle_only(&self, settle: Settle) -> Result<(), Interrupted> {
        self.store
            .commit(Commit {
                settle: Some(settle),
                ..Commit::default()
            })
            .await?;
        Ok(())
    }

    /// Handles one message to the end: its outcome committed, or it deferred or parked.
    async fn handle(&mut self, message: Message, source: Source) -> Result<(), Interrupted> {
        let settle = self.settle(&message, source);
        if source == Source::Category
            && let Some(due_ms) = message.not_before_ms
            && due_ms > now_ms()
        {
            tracing::debug!(consumer = %self.id, id = %message.id, due_ms, "deferred");
            self.store
                .commit(Commit {
                    settle: Some(settle),
                    defer: vec![DeferredMessage {
                        consumer: self.id.clone(),
                        message,
                        due_ms,
                    }],
                    ..Commit::default()
                })
                .await?;
            return Ok(());
        }

        // A sealed command: the handler gets its fields in clear, everything stored (park and
        // defer records, the outcome's ids) keeps `message` as it is stored, sealed. Its key is
        // read once; it stays until the commit that settles the command, which shreds it.
        let sealed = message.stream.is_command() && seal::is_sealed(&message);
        let mut clear = None;
        let mut unopenable = None;
        if sealed {
            let key = self.store.seal_key(&message.id).await?;
            match seal::unseal(&message, key.as_deref()) {
                Ok(opened) => clear = Some(opened),
                // Not for the handler to decide on a placeholder: parked, with the reason.
                Err(e) => unopenable = Some(e.to_string()),
            }
        }
        let mut deliveries = 0;
        let mut conflicts = 0;
        let started = std::time::Instant::now();
        loop {
            deliveries += 1;
            if let Some(reason) = unopenable.take() {
                self.park(message, settle, reason, deliveries, started)
                    .await?;
                return Ok(());
            }
            let decided = decide(
                self.component.clone(),
                self.projections.clone(),
                self.store.clone(),
                self.mail.clone(),
                clear.clone().unwrap_or_else(|| message.clone()),
            )
            .await;
            let failure = match decided {
                Ok(decision) => match self.outcome_commit(&message, decision, settle.clone()) {
                    Ok(mut commit) => {
                        if sealed {
                            commit.shred.push(message.id.clone());
                        }
                        match self.store.commit(commit).await {
                            Ok(committed) => {
                                tracing::debug!(
                                    consumer = %self.id, id = %message.id,
                                    written = committed.written.len(),
                                    duplicates = committed.duplicates.len(),
                                    "handled"
                                );
                                record(self.service(), 1, 0, started.elapsed());
                                return Ok(());
                            }
                            Err(StoreError::Conflict { .. }) if conflicts < CONFLICT_RETRIES => {
                                // Someone wrote to the entity meanwhile: decide again on fresh
                                // state.
                                conflicts += 1;
                                deliveries -= 1;
                                continue;
                            }
                            Err(e @ StoreError::Conflict { .. }) => {
                                format!("the entity kept changing while handling: {e}")
                            }
                            Err(
                                e @ (StoreError::Name(_)
                                | StoreError::InvalidMessage { .. }
                                | StoreError::TooLarge { .. }),
                            ) => {
                                format!("invalid outcome: {e}")
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Err(reason) => format!("invalid outcome: {reason}"),
                },
                Err(Decline::Store(e)) => return Err(e.into()),
                Err(Decline::Guest(GuestError::Transient(reason)))
                    if deliveries < self.config.max_deliveries =>
                {
                    let delay = self.retry_delay(deliveries);
                    tracing::warn!(
                        consumer = %self.id, id = %message.id, deliveries,
                        "transient failure, retrying in {delay:?}: {reason}"
                    );
                    self.sleep(delay).await?;
                    continue;
                }
                Err(Decline::Guest(e @ GuestError::Transient(_))) => {
                    format!("{e} (gave up after {deliveries} deliveries)")
                }
                Err(Decline::Guest(e)) => e.to_string(),
            };
            self.park(message, settle, failure, deliveries, started)
                .await?;
            return Ok(());
        }
    }

    /// Parks a message with the reason, settling it. A sealed command keeps its key (and its
    /// fields sealed in the record), so that a replay can still open them.
    async fn park(
        &self,
        message: Message,
        settle: Settle,
        failure: String,
        deliveries: u32,
        started: std::time::Instant,
    ) -> Result<(), Interrupted> {
        tracing::warn!(consumer = %self.id, id = %message.id, "parked: {failure}");
        record(self.service(), 0, 1, started.elapsed());
        self.store
            .commit(Commit {
                settle: Some(settle),
                park: vec![ParkedMessage {
                    consumer: self.id.clone(),
                    message,
                    reason: failure,
                    attempts: deliveries,
                    parked_at_ms: now_ms(),
                }],
                ..Commit::default()
            })
            .await?;
        Ok(())
    }

    fn retry_delay(&self, deliveries: u32) -> Duration {
        let factor = 2u32.saturating_pow(deliveries.saturating_sub(1).min(16));
        self.config
            .retry_base
            .saturating_mul(factor)
            .min(self.config.retry_max)
    }

    /// Checks a guest's outcome and turns it into the commit that settles the message.
    fn outcome_commit(
        &self,
        handled: &Message,
        decision: Decision,
        settle: Settle,
    ) -> Result<Commit, String> {
        let Decision {
            outcome,
            entity,
            version,
        } = decision;
        let checked = check_outcome(self.component.manifest(), handled, outcome)?;
        Ok(Commit {
            appends: group_appends(checked.messages, |stream| {
                (entity.as_ref() == Some(stream)).then_some(version)
            }),
            views: checked.views,
            settle: Some(settle),
            ..Commit::default()
        })
    }
}

/// An outcome that passed the checks: messages with their ids and metadata, view writes.
#[derive(Debug, Default)]
struct CheckedOutcome {
    messages: Vec<(StreamName, NewMessage)>,
    views: Vec<ViewWrite>,
}

/// Checks what a guest returned for `handled`: sizes, stream names, ownership of event categories,
/// JSON, declared views. Derives the outgoing ids and propagates the metadata.
fn check_outcome(
    manifest: &crate::wasm::Manifest,
    handled: &Message,
    outcome: Outcome,
) -> Result<CheckedOutcome, String> {
    if outcome.messages.len() > MAX_OUTCOME_MESSAGES {
        return Err(format!(
            "{} messages, more than the limit of {MAX_OUTCOME_MESSAGES}",
            outcome.messages.len()
        ));
    }
    let bytes: usize = outcome
        .messages
        .iter()
        .map(|m| m.data.len() + m.metadata.as_ref().map_or(0, String::len))
        .chain(
            outcome
                .views
                .iter()
                .map(|v| v.value.as_ref().map_or(0, String::len)),
        )
        .sum();
    if bytes > MAX_OUTCOME_BYTES {
        return Err(format!(
            "{bytes} bytes of JSON, more than the limit of {MAX_OUTCOME_BYTES}"
        ));
    }

    let mut propagated = Map::new();
    for key in ["originEntity", "correlationId"] {
        if let Some(value) = handled.metadata.get(key) {
            propagated.insert(key.to_owned(), value.clone());
        }
    }
    propagated.insert("causationId".into(), Value::String(handled.id.clone()));

    let mut checked = CheckedOutcome::default();
    for (index, outgoing) in outcome.messages.into_iter().enumerate() {
        let stream = StreamName::parse(&outgoing.stream).map_err(|e| e.to_string())?;
        if !stream.is_command() && stream.category_str() != manifest.name {
            return Err(format!(
                "service {} may write events only to its own category {}, not to {stream}",
                manifest.name, manifest.name
            ));
        }
        let data = json_object(&outgoing.data, "data")?;
        let mut metadata = propagated.clone();
        if let Some(extra) = &outgoing.metadata {
            metadata.extend(json_object(extra, "metadata")?);
        }
        if outgoing.message_type.is_empty() {
            return Err("a message has an empty type".into());
        }
        let id = derived_id(&[&manifest.name, &handled.id, &index.to_string()]);
        checked.messages.push((
            stream,
            NewMessage {
                id,
                message_type: outgoing.message_type,
                data: Value::Object(data),
                metadata,
                not_before_ms: outgoing.not_before_ms,
            },
        ));
    }

    for change in outcome.views {
        if !manifest.views.contains(&change.table) {
            return Err(format!(
                "view table {} is not declared in the manifest of {}",
                change.table, manifest.name
            ));
        }
        let value = match change.value {
            Some(text) => Some(serde_json::from_str::<Value>(&text).map_err(|e| {
                format!(
                    "view row {}/{}: invalid JSON: {e}",
                    change.table, change.key
                )
            })?),
            None => None,
        };
        checked.views.push(ViewWrite {
            table: change.table,
            key: change.key,
            value,
            seq: handled.global_position,
        });
    }
    Ok(checked)
}

/// Groups messages by stream, streams in order of first appearance, each with its expected
/// version.
fn group_appends(
    messages: Vec<(StreamName, NewMessage)>,
    expected_version: impl Fn(&StreamName) -> Option<u64>,
) -> Vec<StreamAppend> {
    let mut appends: Vec<StreamAppend> = Vec::new();
    for (stream, message) in messages {
        match appends.iter_mut().find(|a| a.stream == stream) {
            Some(append) => append.messages.push(message),
            None => appends.push(StreamAppend {
                expected_version: expected_version(&stream),
                stream,
                messages: vec![message],
            }),
        }
    }
    appends
}

fn json_object(text: &str, what: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(format!("{what} must be a JSON object")),
        Err(e) => Err(format!("{what} is not valid JSON: {e}")),
    }
}

/// A handler's decision and the entity version it was made on.
struct Decision {
    outcome: Outcome,
    entity: Option<StreamName>,
    version: u64,
}

enum Decline {
    Guest(GuestError),
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
async fn decide(
    component: Arc<ServiceComponent>,
    projections: Arc<ProjectionCache>,
    store: Arc<dyn MessageStore>,
    mail: Option<Arc<Maildir>>,
    message: Message,
) -> Result<Decision, Decline> {
    let runtime = Handle::current();
    let joined = tokio::task::spawn_blocking(move || {
        let service = component.manifest().name.clone();
        let entity = entity_of(&service, &message);
        let host = StoreHost {
            runtime: runtime.clone(),
            store: store.clone(),
            service,
            handled_id: message.id.clone(),
            mail,
            overlay: None,
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
        .map_err(Decline::Guest)?;
        Ok(Decision {
            outcome,
            entity,
            version,
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
enum BatchItem {
    Decided(CheckedOutcome),
    Park { message: Message, reason: String },
    Defer { message: Message, due_ms: u64 },
}

/// A batch's decisions, ready to be committed together.
#[derive(Default)]
struct BatchDecision {
    items: Vec<BatchItem>,
    /// The version of each entity the batch projected, as the batch found it (stored, plus what
    /// the page in flight writes): the expected versions.
    expected: HashMap<StreamName, u64>,
    /// The page was tried in lanes, which met; it was decided on one thread instead.
    lanes_met: bool,
    /// The messages and view rows it writes, as the next page's overlay starts.
    writes: Overlay,
}

/// What a page is decided with: the service's code, its cached states, the store it reads, and
/// the mail capability when granted.
#[derive(Clone)]
struct Decider {
    component: Arc<ServiceComponent>,
    projections: Arc<ProjectionCache>,
    store: Arc<dyn MessageStore>,
    mail: Option<Arc<Maildir>>,
    reuse_instances: bool,
}

/// True when a page's commit stored its writes where the next page, decided on top of them,
/// expected them: each stream's messages at the carried base, none dropped as a duplicate.
fn stored_as_carried(writes: &Overlay, committed: &Committed) -> bool {
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

/// Why a batch could not be decided as one.
enum BatchDecline {
    /// A message failed transiently: handle the page one message at a time, with retries.
    OneByOne,
    Store(StoreError),
}

/// Decides a page of messages so that their outcomes can be committed together with one flush.
///
/// The page's entities are spread over `lanes` blocking threads, each deciding its messages in
/// page order. That is only the same as deciding the whole page in order when the lanes did not
/// meet: no handler read through the host (a view, another stream) and no stream or view row was
/// touched by two lanes. When they met, the lanes' work is dropped and the page is decided again
/// on one thread (and `lanes_met` tells the consumer to stop trying). A service with the mail
/// capability always uses one thread, so no email is sent by work that is dropped.
async fn decide_batch(
    decider: Decider,
    messages: Arc<[Message]>,
    carry: Option<Arc<Overlay>>,
    lanes: usize,
) -> Result<BatchDecision, BatchDecline> {
    let runtime = Handle::current();
    let split = if decider.mail.is_none() {
        split_by_entity(&decider.component.manifest().name, &messages, lanes)
    } else {
        Vec::new()
    };
    let mut lanes_met = false;
    if split.len() > 1 {
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
            return Ok(merge_lanes(decided));
        }
        lanes_met = true;
    }
    let joined = tokio::task::spawn_blocking(move || {
        decide_lane(&runtime, &decider, carry.as_deref(), messages.iter())
    })
    .await;
    let mut decision = joined.map_err(|_| BatchDecline::OneByOne)??.decision;
    decision.lanes_met = lanes_met;
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
    /// Reads handlers made through the host.
    host_reads: usize,
}

/// True when no two lanes could have seen each other's decisions.
fn lanes_apart(lanes: &[LaneDecision]) -> bool {
    if lanes.iter().any(|lane| lane.host_reads > 0) {
        return false;
    }
    let mut streams = HashSet::new();
    let mut views = HashSet::new();
    lanes.iter().all(|lane| {
        lane.streams.iter().all(|stream| streams.insert(stream))
            && lane.views.iter().all(|row| views.insert(row))
    })
}

fn merge_lanes(lanes: Vec<LaneDecision>) -> BatchDecision {
    let mut merged = BatchDecision::default();
    for lane in lanes {
        merged.items.extend(lane.decision.items);
        merged.expected.extend(lane.decision.expected);
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
    let overlay: SharedOverlay =
        Arc::new(std::sync::Mutex::new(carry.cloned().unwrap_or_default()));
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
            mail: mail.clone(),
            overlay: Some(overlay.clone()),
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
                    let own_added = added - carried_of(stream) as u64;
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
        let outcome = match decided {
            Ok(outcome) => outcome,
            Err(Decline::Store(e)) => return Err(BatchDecline::Store(e)),
            Err(Decline::Guest(GuestError::Transient(_))) => {
                return Err(BatchDecline::OneByOne);
            }
            Err(Decline::Guest(e)) => {
                decision.items.push(BatchItem::Park {
                    message: message.clone(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let checked = match check_outcome(manifest, message, outcome) {
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
                    let stored = match states.get(stream) {
                        Some((_, version)) => *version,
                        None => runtime
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
            own_views.insert(row);
        }
        drop(pending);
        decision.items.push(BatchItem::Decided(checked));
    }
    let Ok(overlay) = overlay.lock() else {
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
    Ok(LaneDecision {
        host_reads: overlay.host_reads,
        decision,
        streams,
        views: own_views,
    })
}

/// Folds a stream through an instance's `project`, from a known `(state, version)`; returns the
/// state (none for an empty stream) and the stream's version. Without a store, only what the
/// overlay has pending is folded.
fn fold(
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

/// The guest's view of the store while it handles one message.
struct StoreHost {
    runtime: Handle,
    store: Arc<dyn MessageStore>,
    service: String,
    handled_id: String,
    mail: Option<Arc<Maildir>>,
    /// What earlier messages of the same batch decided, not yet committed.
    overlay: Option<SharedOverlay>,
}

/// Messages and view rows decided by earlier messages of a batch and not yet committed. Later
/// messages of the batch read through it, so they decide on what the batch will have written
/// (the users view, a username claim, the entity's own events).
#[derive(Debug, Default, Clone)]
struct Overlay {
    /// Stream → (the version its first pending message goes at, the pending messages): the
    /// stored version when the batch first wrote to it, or where the page in flight's go.
    pending: HashMap<StreamName, (u64, Vec<Message>)>,
    views: HashMap<(String, String), Option<Value>>,
    /// Reads handlers made through the host (streams, views), which may see other entities.
    host_reads: usize,
}

type SharedOverlay = Arc<std::sync::Mutex<Overlay>>;

/// A stream's state folded by `project` (none for an empty stream) and the version it is at.
type Folded = (Option<String>, u64);

/// A stream as a handler should see it: the stored messages (none read without a store), then
/// those the batch added.
fn read_merged(
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
    Ok(merge_pending(overlay, stream, from, limit, stored))
}

/// Stored messages of a stream read from `from`, with what the batch added in place of what
/// they would have been.
fn merge_pending(
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

/// The first page of each entity a lane will fold, read from the store at once (concurrently:
/// on JetStream each read is a round trip), with the cached projection it continues.
fn prefetch_entities(
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

impl StoreHost {
    fn count_read(&self) {
        if let Some(overlay) = &self.overlay
            && let Ok(mut overlay) = overlay.lock()
        {
            overlay.host_reads += 1;
        }
    }
}

impl GuestHost for StoreHost {
    fn read_stream(&mut self, stream: &str, from_position: u64) -> Result<Vec<Message>, String> {
        self.count_read();
        let stream = StreamName::parse(stream).map_err(|e| e.to_string())?;
        read_merged(
            &self.runtime,
            Some(self.store.as_ref()),
            self.overlay.as_ref(),
            &stream,
            from_position,
            crate::wasm::READ_STREAM_LIMIT,
        )
        .map_err(|e| e.to_string())
    }

    fn view_get(&mut self, table: &str, key: &str) -> Result<Option<String>, String> {
        self.count_read();
        validate_table_name(table).map_err(|e| e.to_string())?;
        if let Some(overlay) = &self.overlay
            && let Ok(overlay) = overlay.lock()
            && let Some(row) = overlay.views.get(&(table.to_owned(), key.to_owned()))
        {
            return Ok(row.as_ref().map(Value::to_string));
        }
        self.runtime
            .block_on(self.store.view_get(table, key))
            .map(|row| row.map(|row| row.value.to_string()))
            .map_err(|e| e.to_string())
    }

    fn new_id(&mut self, name: &str) -> String {
        derived_id(&[&self.service, &self.handled_id, "new-id", name])
    }

    fn deliver_email(&mut self, email_id: &str, message: &str) -> Result<(), String> {
        let Some(maildir) = &self.mail else {
            return Err(format!(
                "service {} is not granted the mail capability",
                self.service
            ));
        };
        maildir
            .deliver(email_id, message)
            .map_err(|e| e.to_string())
    }
}

/// A service's event consumers: one per subscribed category, with its origin filter.
pub fn subscriptions_of(
    component: &ServiceComponent,
) -> anyhow::Result<Vec<(ConsumerId, Option<String>)>> {
    let manifest = component.manifest();
    manifest
        .subscriptions
        .iter()
        .map(|subscription| {
            Ok((
                ConsumerId::new(
                    Category::parse(&subscription.category)?,
                    consumer_name(&manifest.name),
                ),
                subscription.origin_prefix.clone(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(entity: &str, n: u64) -> Message {
        Message {
            id: format!("{entity}-{n}"),
            stream: StreamName::parse(&format!("counter:command.{entity}")).expect("stream"),
            message_type: "Increment".into(),
            data: Value::Null,
            metadata: Map::new(),
            position: n,
            global_position: n,
            time_ms: 0,
            not_before_ms: None,
        }
    }

    fn lane(streams: &[&str], views: &[&str], host_reads: usize) -> LaneDecision {
        LaneDecision {
            decision: BatchDecision::default(),
            streams: streams
                .iter()
                .map(|s| StreamName::parse(s).expect("stream"))
                .collect(),
            views: views
                .iter()
                .map(|key| ("totals".to_owned(), (*key).to_owned()))
                .collect(),
            host_reads,
        }
    }

    #[test]
    fn splits_a_page_by_entity_keeping_each_entitys_order() {
        let page: Vec<Message> = (0..60)
            .map(|n| command(&format!("e{}", n % 6), n))
            .collect();
        let lanes: Vec<Vec<&Message>> = split_by_entity("counter", &page, 2)
            .into_iter()
            .map(|lane| lane.into_iter().map(|i| &page[i]).collect())
            .collect();
        assert_eq!(lanes.len(), 2, "six entities spread over two lanes");
        assert_eq!(lanes.iter().map(Vec::len).sum::<usize>(), 60);
        for (i, lane) in lanes.iter().enumerate() {
            assert!(
                lane.windows(2)
                    .all(|pair| pair[0].global_position < pair[1].global_position),
                "page order within a lane"
            );
            for other in &lanes[i + 1..] {
                assert!(
                    lane.iter()
                        .all(|m| other.iter().all(|o| o.stream != m.stream)),
                    "an entity lives in one lane"
                );
            }
        }
    }

    #[test]
    fn one_entity_or_one_lane_is_not_split() {
        let page: Vec<Message> = (0..10).map(|n| command("only", n)).collect();
        assert!(split_by_entity("counter", &page, 4).is_empty());
        let page: Vec<Message> = (0..10).map(|n| command(&format!("e{n}"), n)).collect();
        assert!(split_by_entity("counter", &page, 1).is_empty());
    }

    #[test]
    fn lanes_meet_on_host_reads_shared_streams_or_shared_view_rows() {
        let apart = [
            lane(&["counter.a"], &["a"], 0),
            lane(&["counter.b"], &["b"], 0),
        ];
        assert!(lanes_apart(&apart));
        let read = [lane(&["counter.a"], &[], 1), lane(&["counter.b"], &[], 0)];
        assert!(!lanes_apart(&read), "a handler read through the host");
        let stream = [
            lane(&["counter.a", "counter.shared"], &[], 0),
            lane(&["counter.b", "counter.shared"], &[], 0),
        ];
        assert!(!lanes_apart(&stream), "two lanes touched one stream");
        let view = [
            lane(&["counter.a"], &["x"], 0),
            lane(&["counter.b"], &["x"], 0),
        ];
        assert!(!lanes_apart(&view), "two lanes wrote one view row");
    }

    /// A counter whose commands may also peek at the `totals` view through the host.
    struct PeekingCounter;

    fn total_of(state: Option<&str>) -> i64 {
        state
            .and_then(|text| serde_json::from_str::<Value>(text).ok())
            .and_then(|state| state["total"].as_i64())
            .unwrap_or(0)
    }

    impl crate::wasm::NativeService for PeekingCounter {
        fn manifest(&self) -> crate::wasm::Manifest {
            crate::wasm::Manifest {
                name: "counter".into(),
                handles_commands: true,
                subscriptions: Vec::new(),
                views: vec!["totals".into()],
            }
        }

        fn project(
            &self,
            _: &mut dyn GuestHost,
            state: Option<&str>,
            event: &Message,
        ) -> Result<String, GuestError> {
            let by = event.data["by"].as_i64().unwrap_or(0);
            Ok(serde_json::json!({ "total": total_of(state) + by }).to_string())
        }

        fn handle_command(
            &self,
            host: &mut dyn GuestHost,
            command: &Message,
            state: Option<&str>,
        ) -> Result<Outcome, GuestError> {
            let entity = command.stream.id();
            let seen = match command.data["peek"].as_bool() {
                Some(true) => host
                    .view_get("totals", entity)
                    .map_err(GuestError::Transient)?,
                _ => None,
            };
            let by = command.data["by"].as_i64().unwrap_or(1);
            let total = total_of(state) + by;
            Ok(Outcome {
                messages: vec![crate::wasm::Outgoing {
                    stream: format!("counter.{entity}"),
                    message_type: "Incremented".into(),
                    data: serde_json::json!({ "by": by, "total": total, "seen": seen }).to_string(),
                    metadata: None,
                    not_before_ms: None,
                }],
                views: vec![crate::wasm::ViewChange {
                    table: "totals".into(),
                    key: entity.into(),
                    value: Some(serde_json::json!({ "total": total }).to_string()),
                }],
            })
        }

        fn handle_event(
            &self,
            _: &mut dyn GuestHost,
            _: &Message,
            _: Option<&str>,
        ) -> Result<Outcome, GuestError> {
            Ok(Outcome::default())
        }
    }

    fn increment(entity: &str, n: u64, data: Value) -> Message {
        Message {
            data,
            ..command(entity, n)
        }
    }

    fn outcome_data(decision: &BatchDecision) -> Vec<Value> {
        decision
            .items
            .iter()
            .filter_map(|item| match item {
                BatchItem::Decided(checked) => Some(checked.messages[0].1.data.clone()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn decides_a_page_on_top_of_what_the_page_in_flight_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn MessageStore> =
            Arc::new(crate::store::SledStore::open(dir.path()).expect("store"));
        let counter_a = StreamName::parse("counter.a").expect("stream");
        // Stored: a at total 1 (version 1).
        store
            .commit(Commit::append(
                counter_a.clone(),
                Some(0),
                vec![NewMessage {
                    id: "stored-1".into(),
                    message_type: "Incremented".into(),
                    data: serde_json::json!({ "by": 1 }),
                    metadata: Map::new(),
                    not_before_ms: None,
                }],
            ))
            .await
            .expect("stored event");
        // In flight, not stored yet: a second event (total 3) and its view row.
        let mut carry = Overlay::default();
        carry.pending.insert(
            counter_a.clone(),
            (
                1,
                vec![Message {
                    id: "carried-2".into(),
                    stream: counter_a.clone(),
                    message_type: "Incremented".into(),
                    data: serde_json::json!({ "by": 2 }),
                    metadata: Map::new(),
                    position: 1,
                    global_position: 0,
                    time_ms: 0,
                    not_before_ms: None,
                }],
            ),
        );
        carry.views.insert(
            ("totals".into(), "a".into()),
            Some(serde_json::json!({ "total": 3 })),
        );
        let component = Arc::new(ServiceComponent::native(Arc::new(PeekingCounter)));
        let projections = Arc::new(ProjectionCache::default());
        let decider = Decider {
            component,
            projections: projections.clone(),
            store: store.clone(),
            mail: None,
            reuse_instances: false,
        };
        let decide = |messages: Vec<Message>, lanes: usize| {
            decide_batch(
                decider.clone(),
                messages.into(),
                Some(Arc::new(carry.clone())),
                lanes,
            )
        };

        let peeking = increment("a", 10, serde_json::json!({ "by": 1, "peek": true }));
        let Ok(decision) = decide(vec![peeking], 1).await else {
            panic!("the page was declined");
        };
        assert_eq!(
            outcome_data(&decision),
            [serde_json::json!({ "by": 1, "total": 4, "seen": r#"{"total":3}"# })],
            "the handler saw the carried event and view row"
        );
        assert_eq!(
            decision.expected.get(&counter_a),
            Some(&2),
            "it expects the version after the page in flight"
        );
        let (base, own) = decision.writes.pending.get(&counter_a).expect("writes a");
        assert_eq!(
            (*base, own.len()),
            (2, 1),
            "it carries on only its own event"
        );
        assert_eq!(
            projections.get(&counter_a),
            (Some(r#"{"total":1}"#.to_owned()), 1),
            "only what is stored is cached"
        );
        let carried = Committed {
            written: vec![Message {
                global_position: 7,
                ..carry.pending[&counter_a].1[0].clone()
            }],
            duplicates: Vec::new(),
        };
        assert!(stored_as_carried(&carry, &carried));
        let moved = Committed {
            written: vec![Message {
                position: 2,
                ..carried.written[0].clone()
            }],
            duplicates: Vec::new(),
        };
        assert!(
            !stored_as_carried(&carry, &moved),
            "stored past where the next page expected it"
        );

        // Two entities on two lanes share the carry without meeting.
        let page = vec![
            increment("a", 10, serde_json::json!({ "by": 1 })),
            increment("b", 11, serde_json::json!({ "by": 5 })),
        ];
        assert_eq!(
            split_by_entity("counter", &page, 2).len(),
            2,
            "a and b on two lanes"
        );
        let Ok(decision) = decide(page, 2).await else {
            panic!("the page was declined");
        };
        assert!(!decision.lanes_met, "the carry is not a meeting point");
        let mut totals: Vec<i64> = outcome_data(&decision)
            .iter()
            .filter_map(|data| data["total"].as_i64())
            .collect();
        totals.sort();
        assert_eq!(totals, [4, 5], "a on top of the carry, b alone");
    }
}
