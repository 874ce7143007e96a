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
//!
//! The runner's parts, one file each: this one holds the running set (`Running`, `ServiceTable`),
//! loading and admitting services, their configuration and metrics; `consumer` the consumer loop;
//! `decide` deciding a message or a page (lanes, overlay); `pace` how big a page is and over how
//! many lanes it is decided, from how long handlers take; `outcome` checking an outcome;
//! `projection` folding streams and the projection cache; `host_imports` what the guest's host
//! calls reach; `group` sharing a consumer's partitions with other instances (membership and
//! leases on a shared store).

mod conflict;
mod consumer;
mod decide;
mod group;
mod host_imports;
mod outcome;
mod pace;
mod projection;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::mail::{Deliverer, Transport};
use crate::store::{
    Category, ConsumerId, DEFAULT_PARTITIONS, GroupSpec, MessageStore, PartitionKey, now_ms,
    validate_table_name,
};
use crate::wasm::ServiceComponent;
use consumer::Consumer;
use group::{Assigner, Owned};
use pace::Pace;

pub use decide::entity_of;
pub use outcome::derived_id;
pub use projection::{Projected, ProjectionCache, SNAPSHOT_EVERY, project};

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
    /// On a shared store: how long an instance's partitions stay its own after its last
    /// heartbeat (it heartbeats five times in that time).
    pub lease_ttl: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            max_deliveries: 5,
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
            reuse_instances: false,
            decide_lanes: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            lease_ttl: Duration::from_secs(5),
        }
    }
}

/// Host capabilities beyond the store, and who may use them.
#[derive(Debug, Clone, Default)]
pub struct Capabilities {
    /// Where the emails of granted services are delivered.
    pub mail: Option<Arc<Transport>>,
    /// Services granted the `mail` capability.
    pub mail_grants: Vec<String>,
}

impl Capabilities {
    fn mail_for(&self, service: &str) -> Option<Arc<Transport>> {
        self.mail
            .clone()
            .filter(|_| self.mail_grants.iter().any(|granted| granted == service))
    }
}

/// How patient the mail deliverer is: an SMTP relay that is down for a few minutes keeps its
/// emails waiting, not parked.
const DELIVERY_RETRIES: u32 = 12;
const DELIVERY_RETRY_MAX: Duration = Duration::from_secs(60);

/// A name for this process among the instances of a service: the host's name and the process
/// id, with a random part so that a restarted process is a new member.
pub fn instance_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &random[..6])
}

/// The consumer name a service uses on every category it reads, as in the article.
pub fn consumer_name(service: &str) -> String {
    format!("microservice:{service}")
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
    /// The name of the process running it among the instances sharing its consumers (`None`
    /// when loaded but not running).
    pub instance: Option<Arc<str>>,
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
                instance: None,
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
    /// This process's name among the instances of its services on a shared store.
    instance: Arc<str>,
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
            instance: instance_name().into(),
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
        let projections = Arc::new(ProjectionCache::new(component.hash()));
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
        let transport = self.capabilities.mail_for(&manifest.name);
        for (id, origin_prefix) in consumers {
            let consumer = ConsumerPlan {
                id,
                origin_prefix,
                component: component.clone(),
                projections: projections.clone(),
                mail: transport.is_some(),
                effects: false,
                config: self.config,
                most_per_page: self.store.batch_size(),
            };
            self.spawn(consumer, &shutdown, &mut tasks);
        }
        // The emails its handlers recorded, delivered after their commits (see `mail`).
        if let Some(transport) = transport.filter(|_| self.with_commands) {
            tracing::info!(service = %manifest.name, to = %transport.describe(), "delivering its emails");
            let deliverer =
                ServiceComponent::native(Arc::new(Deliverer::new(&manifest.name, transport)));
            let consumer = ConsumerPlan {
                id: ConsumerId::new(
                    Category::outbox_of(&manifest.name)?,
                    consumer_name(&manifest.name),
                ),
                origin_prefix: None,
                projections: Arc::new(ProjectionCache::new(deliverer.hash())),
                component: Arc::new(deliverer),
                mail: false,
                effects: true,
                config: RunnerConfig {
                    max_deliveries: self.config.max_deliveries.max(DELIVERY_RETRIES),
                    retry_max: self.config.retry_max.max(DELIVERY_RETRY_MAX),
                    ..self.config
                },
                // One email per commit: a stop between delivering and recording repeats one.
                most_per_page: 1,
            };
            self.spawn(consumer, &shutdown, &mut tasks);
        }
        self.services
            .insert(manifest.name.clone(), ServiceRun { shutdown, tasks });
        self.table.put(ServiceInfo {
            name: manifest.name.clone(),
            path: service.path.clone(),
            component,
            since_ms: now_ms(),
            instance: Some(self.instance.clone()),
        });
        Ok(())
    }

    /// Starts a consumer with its assigner, which shares its partitions with other instances.
    fn spawn(&self, plan: ConsumerPlan, shutdown: &watch::Sender<bool>, tasks: &mut JoinSet<()>) {
        let ConsumerPlan {
            id,
            origin_prefix,
            component,
            projections,
            mail,
            effects,
            config,
            most_per_page,
        } = plan;
        let spec = GroupSpec {
            partitions: DEFAULT_PARTITIONS,
            key: match origin_prefix {
                Some(_) => PartitionKey::OriginEntity,
                None => PartitionKey::Entity,
            },
        };
        let shared = self.store.leases().is_some();
        let (owned, owned_changes) = watch::channel(match shared {
            true => Owned::Leased(Default::default()),
            false => Owned::All,
        });
        let assigner = Assigner {
            store: self.store.clone(),
            consumer: id.clone(),
            spec,
            instance: self.instance.clone(),
            ttl: config.lease_ttl,
            owned,
        };
        let lanes = if effects { 1 } else { config.decide_lanes };
        let consumer = Consumer {
            id,
            position: 0,
            spec,
            positions: Vec::new(),
            positions_read: None,
            reading: Owned::Leased(Default::default()),
            owned: owned_changes,
            origin_prefix,
            mail,
            effects,
            component,
            projections,
            store: self.store.clone(),
            config,
            pace: Pace::new(most_per_page, lanes),
            shutdown: shutdown.subscribe(),
        };
        // The assigner releases this instance's leases only once the consumer has stopped,
        // so nothing is committed under a lease after it is given up.
        let (stopped, stopped_changes) = watch::channel(false);
        // In the span of whoever started the service (a `ferry test` scenario names itself in
        // every line its consumers log).
        tasks.spawn(
            async move {
                let consumer = async move {
                    consumer.run().await;
                    let _ = stopped.send(true);
                };
                tokio::join!(consumer, assigner.run(stopped_changes));
            }
            .in_current_span(),
        );
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

/// What a consumer of a service is started with.
struct ConsumerPlan {
    id: ConsumerId,
    origin_prefix: Option<String>,
    component: Arc<ServiceComponent>,
    projections: Arc<ProjectionCache>,
    mail: bool,
    effects: bool,
    config: RunnerConfig,
    most_per_page: usize,
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
