//! The `ferry` command line: argument definitions, wiring of the parts for `ferry run`, and the
//! readable (or `--json`) rendering of answers. `main.rs` only calls [`main`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::control::{self, Context, Request};
use crate::gateway::{self, GatewayConfig};

mod http;
mod new;
mod render;

pub use self::http::HttpArgs;
use crate::mail::Maildir;
use crate::reload::{self, Reloader};
use crate::service::{self, Capabilities, LoadedService, RunnerConfig, Running, ServiceTable};
use crate::store::{MessageStore, NatsStore, SledStore, StoreError};
use crate::wasm::{Limits, Runtime};

/// Ferry: event-driven services as sandboxed Wasm components.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about)]
pub struct Cli {
    /// Data folder: the embedded store, the precompiled-code cache and the control socket.
    #[arg(long, global = true, default_value = "./data", env = "FERRY_DATA")]
    pub data: PathBuf,
    /// Services folder: one `.wasm` component per service.
    #[arg(
        long,
        global = true,
        default_value = "./services",
        env = "FERRY_SERVICES"
    )]
    pub services: PathBuf,
    /// The store: `sled` (embedded, in the data folder) or
    /// `nats://HOST:PORT[,HOST:PORT...][/NAMESPACE][?replicas=N]` (a JetStream namespace that
    /// several Ferry processes share, kept by N servers of a cluster).
    #[arg(
        long,
        global = true,
        default_value = "sled",
        env = "FERRY_STORE",
        value_parser = parse_store
    )]
    pub store: StoreChoice,
    /// Print answers as JSON, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the messages live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    /// The embedded sled store in `DATA/store`, one process at a time.
    Sled,
    /// A JetStream namespace: `nats://HOST:PORT[,HOST:PORT...][/NAMESPACE][?replicas=N]`.
    Nats(String),
}

fn parse_store(text: &str) -> Result<StoreChoice, String> {
    if text == "sled" {
        Ok(StoreChoice::Sled)
    } else if text.starts_with("nats://") {
        Ok(StoreChoice::Nats(text.to_owned()))
    } else {
        Err(format!(
            "{text:?}: expected sled or nats://HOST:PORT[,HOST:PORT...][/NAMESPACE][?replicas=N]"
        ))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the services of the services folder until interrupted.
    Run {
        /// Run only these services of the services folder (comma-separated names), so that the
        /// same components run as one process or as one process per service.
        #[arg(long, value_delimiter = ',', value_name = "SERVICE,...")]
        only: Vec<String>,
        #[command(flatten)]
        http: HttpArgs,
        /// Longest time one call into a guest may run, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        guest_timeout_ms: u64,
        /// Largest memory a guest may grow to, in MiB.
        #[arg(long, default_value_t = 64)]
        guest_memory_mib: usize,
        /// Deliveries of a transiently failing message before it is parked.
        #[arg(long, default_value_t = 5)]
        max_deliveries: u32,
        /// First retry delay after a transient failure, in milliseconds (doubles each time).
        #[arg(long, default_value_t = 100)]
        retry_base_ms: u64,
        /// Reuse a healthy guest instance for the messages of a batch instead of a fresh one per
        /// message (faster; only for guests that keep no state between calls).
        #[arg(long)]
        reuse_instances: bool,
        /// Threads on which one consumer decides the entities of a page at the same time
        /// (default: one per core, at most 4; 1 decides every page in order on one thread).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=64))]
        decide_lanes: Option<u8>,
        /// On JetStream: how long an instance's partitions stay its own after its last heartbeat
        /// (it renews five times in that time). A killed instance's share moves after about
        /// this long; a graceful stop hands it over at once.
        #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(500..))]
        lease_ttl_ms: u64,
        /// The embedded store's page cache, in MiB: sled keeps this much of the store's recent
        /// pages in memory, whatever the length of the history behind it.
        #[arg(long, value_name = "MIB", default_value_t = crate::store::DEFAULT_CACHE_BYTES >> 20, value_parser = clap::value_parser!(u64).range(8..))]
        store_cache_mib: u64,
        /// A limit for one service, overriding the defaults above:
        /// `SERVICE:timeout-ms=N` or `SERVICE:memory-mib=N` (repeatable).
        #[arg(long = "service-limit", value_name = "SERVICE:KEY=N", value_parser = parse_service_limit)]
        service_limits: Vec<ServiceLimit>,
        /// Services granted the mail capability (delivery into DATA/maildir).
        #[arg(long = "mail-grant", value_name = "SERVICE", default_value = "email")]
        mail_grants: Vec<String>,
    },
    /// Append a message (normally a command) to a stream.
    Send {
        /// Target stream, such as `user:command.42`.
        stream: String,
        /// Message type, such as `RegisterUser`.
        #[arg(value_name = "TYPE")]
        message_type: String,
        /// The data, a JSON object.
        #[arg(value_name = "JSON")]
        payload: String,
        /// Metadata, a JSON object (`originEntity`, `correlationId`, ...).
        #[arg(long)]
        metadata: Option<String>,
        /// Message id (default: a new UUID). Sending the same id twice stores it once.
        #[arg(long)]
        id: Option<String>,
        /// Refuse unless the stream holds exactly this many messages.
        #[arg(long)]
        expected_version: Option<u64>,
        /// Store these top-level data fields sealed: encrypted under a key of the command's own
        /// that is destroyed once the command is handled (comma-separated or repeated).
        #[arg(long, value_delimiter = ',', value_name = "FIELD")]
        sealed: Vec<String>,
    },
    /// Read a stream (`user.42`, from a position) or a category (`user`, past a global position).
    Read {
        #[arg(value_name = "STREAM|CATEGORY")]
        target: String,
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// List consumers with their positions and lag, per partition, and who owns each.
    Consumers {
        /// Only the consumers of this category.
        category: Option<String>,
    },
    /// List the live instances sharing each consumer group (on JetStream), with the partitions
    /// each holds, how long it has held them and its last heartbeat.
    Instances {
        /// Only the consumers of this category.
        category: Option<String>,
    },
    /// Read a view table (view data), or one row of it.
    View {
        table: String,
        key: Option<String>,
        /// Start after this key.
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// List parked (dead-letter) messages with the reason.
    Parked,
    /// Hand parked messages back to their consumers.
    Replay {
        /// The parked message's id.
        id: Option<String>,
        /// Replay every parked message of this consumer (with --category).
        #[arg(long, requires = "category")]
        consumer: Option<String>,
        #[arg(long, requires = "consumer")]
        category: Option<String>,
    },
    /// List the services with the version (content hash) running and since when.
    Services,
    /// Show a stream's projected state, folded by the owning service's `project`.
    Project { stream: String },
    /// Empty a view (and the other views of the service writing it) and rebuild it from the event
    /// history, showing progress. Runs in the host when one is running, otherwise here.
    Rebuild { table: String },
    /// Load a component and print its manifest, or why it cannot run.
    Inspect { component: PathBuf },
    /// Write a new service folder: the WIT, a minimal service in the language (one command, one
    /// event, a projection, a view), its scenarios for `ferry test`, and how to build it.
    New {
        /// The service's name (letters, digits, '-' and '_'), also the folder's.
        name: String,
        #[arg(long, value_enum)]
        lang: new::Lang,
        /// Where the folder goes.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Run the host on the services built from a folder of service sources (each as `ferry new`
    /// writes it): a service is rebuilt when its sources change, its scenarios run, and it is
    /// hot-reloaded if they pass; a failing build or scenario is shown and the running version
    /// stays.
    Dev {
        /// The folder of service folders.
        sources: PathBuf,
        /// Services granted the mail capability (delivery into DATA/maildir).
        #[arg(long = "mail-grant", value_name = "SERVICE", default_value = "email")]
        mail_grants: Vec<String>,
    },
    /// Run given / when / then scenarios (TOML, see guests/README.md) against a component
    /// through the host's real path, each on a throwaway store; no running host is needed.
    /// Exits 1 when a scenario fails, showing what differs.
    Test {
        /// The service component (`.wasm`).
        component: PathBuf,
        /// Scenario files.
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
    },
    /// Set how many JetStream servers keep the namespace of `--store nats://...` (1 to 5). The
    /// servers copy it to the new replicas in the background; whoever may change the stream on
    /// the NATS account may do this.
    Replicas {
        #[arg(value_parser = clap::value_parser!(u8).range(1..=5))]
        count: u8,
    },
    /// Issue a signed end-user token (HS256) for tests and demos; real deployments take tokens
    /// from their identity provider.
    Token {
        /// The token's subject: the user it stands for (`{sub}` in the policy).
        #[arg(long)]
        sub: String,
        /// The shared secret, the same file as `ferry run --http-jwt-secret-file`.
        #[arg(long, value_name = "FILE")]
        secret_file: PathBuf,
        /// How long the token is valid: 90s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = gateway::parse_ttl)]
        ttl: Duration,
    },
}

/// Runs the command line.
pub async fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            only,
            http,
            guest_timeout_ms,
            guest_memory_mib,
            max_deliveries,
            retry_base_ms,
            reuse_instances,
            decide_lanes,
            lease_ttl_ms,
            store_cache_mib,
            mail_grants,
            service_limits,
        } => {
            let limits = Limits {
                call_timeout: Duration::from_millis(guest_timeout_ms),
                memory_bytes: guest_memory_mib.saturating_mul(1024 * 1024),
            };
            let defaults = RunnerConfig::default();
            let config = RunnerConfig {
                max_deliveries: max_deliveries.max(1),
                retry_base: Duration::from_millis(retry_base_ms),
                reuse_instances,
                decide_lanes: decide_lanes.map_or(defaults.decide_lanes, usize::from),
                lease_ttl: Duration::from_millis(lease_ttl_ms),
                ..defaults
            };
            let capabilities = Capabilities {
                maildir: Some(Arc::new(Maildir::new(maildir(&cli.data)))),
                mail_grants,
            };
            let settings = HostSettings {
                store: cli.store,
                store_cache_bytes: store_cache_mib << 20,
                only,
                http: http.gateway().await?,
                limits,
                service_limits,
                config,
                capabilities,
            };
            run(&cli.data, &cli.services, &settings).await
        }
        Command::Token {
            sub,
            secret_file,
            ttl,
        } => {
            let secret = gateway::read_secret(&secret_file)?;
            println!("{}", gateway::issue_token(&secret, &sub, ttl)?);
            Ok(())
        }
        Command::Rebuild { table } => {
            rebuild(&cli.data, &cli.services, &cli.store, table, cli.json).await
        }
        Command::Dev {
            sources,
            mail_grants,
        } => {
            let settings = HostSettings {
                store: cli.store,
                store_cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
                only: Vec::new(),
                http: None,
                limits: Limits::default(),
                service_limits: Vec::new(),
                config: RunnerConfig::default(),
                capabilities: Capabilities {
                    maildir: Some(Arc::new(Maildir::new(maildir(&cli.data)))),
                    mail_grants,
                },
            };
            std::fs::create_dir_all(&cli.services).with_context(|| {
                format!(
                    "cannot create the services folder {}",
                    cli.services.display()
                )
            })?;
            let runtime = Runtime::new(Some(cache_dir(&cli.data)))?;
            let builder =
                crate::dev::watch(runtime, sources, cli.services.clone(), cli.data.clone())?;
            let ran = run(&cli.data, &cli.services, &settings).await;
            builder.abort();
            ran
        }
        Command::New { name, lang, dir } => {
            let folder = new::write_service(&dir, &name, lang)?;
            let component = new::component_path(&name, lang);
            println!("wrote {} (see its README.md); then:", folder.display());
            println!("  cd {}", folder.display());
            println!(
                "  # build: {}",
                match lang {
                    new::Lang::Rust => "cargo build --release --target wasm32-wasip2".to_owned(),
                    new::Lang::Js => format!(
                        "npm install && npx componentize-js app.js --wit wit -n service -o {component} -d stdio random clocks http fetch-event"
                    ),
                    new::Lang::Python =>
                        format!("componentize-py -d wit -w service componentize app -o {component}"),
                }
            );
            println!("  ferry test {component} scenarios.toml");
            Ok(())
        }
        Command::Test {
            component,
            scenarios,
        } => {
            let runtime = Runtime::new(Some(cache_dir(&cli.data)))?;
            let loaded = runtime
                .load_file(&component, Limits::default())
                .with_context(|| format!("{} cannot run", component.display()))?;
            let results = crate::scenario::run_files(&component, &loaded, &scenarios).await?;
            crate::scenario::print(&results, cli.json);
            let failed = results.iter().filter(|r| !r.passed).count();
            anyhow::ensure!(
                failed == 0,
                "{failed} of {} scenarios failed",
                results.len()
            );
            Ok(())
        }
        Command::Replicas { count } => {
            let StoreChoice::Nats(url) = &cli.store else {
                anyhow::bail!(
                    "the embedded store is one copy in its data folder; replicas are for a \
                     JetStream namespace (--store nats://...)"
                );
            };
            let before = NatsStore::set_replicas(url, usize::from(count)).await?;
            let answer = serde_json::json!({ "before": before, "replicas": count });
            render::print(cli.json, "replicas", &answer);
            Ok(())
        }
        Command::Inspect { component } => {
            let runtime = Runtime::new(Some(cache_dir(&cli.data)))?;
            let loaded = runtime
                .load_file(&component, Limits::default())
                .with_context(|| format!("{} cannot run", component.display()))?;
            let manifest = loaded.manifest();
            let answer = serde_json::json!({
                "name": manifest.name,
                "version": loaded.hash(),
                "handlesCommands": manifest.handles_commands,
                "subscriptions": manifest.subscriptions.iter().map(|s| serde_json::json!({
                    "category": s.category, "originPrefix": s.origin_prefix })).collect::<Vec<_>>(),
                "views": manifest.views,
            });
            render::print(cli.json, "inspect", &answer);
            Ok(())
        }
        command => {
            // `instances` is the consumers' answer seen by instance.
            let by_instance = matches!(command, Command::Instances { .. });
            let request = request_of(command).context("this command is not a store request")?;
            let answer = answer(&cli.data, &cli.services, &cli.store, request.clone()).await?;
            let kind = if by_instance {
                "instances"
            } else {
                kind_of(&request)
            };
            render::print(cli.json, kind, &answer);
            Ok(())
        }
    }
}

/// The store request a command stands for; `None` for `run` and `inspect`.
fn request_of(command: Command) -> Option<Request> {
    Some(match command {
        Command::Send {
            stream,
            message_type,
            payload,
            metadata,
            id,
            expected_version,
            sealed,
        } => Request::Send {
            stream,
            message_type,
            data: payload,
            metadata,
            id,
            expected_version,
            sealed,
        },
        Command::Read {
            target,
            from,
            limit,
        } => Request::Read {
            target,
            from,
            limit,
        },
        Command::Consumers { category } | Command::Instances { category } => {
            Request::Consumers { category }
        }
        Command::View {
            table,
            key,
            after,
            limit,
        } => Request::View {
            table,
            key,
            after,
            limit,
        },
        Command::Parked => Request::Parked,
        Command::Replay {
            id,
            consumer,
            category,
        } => Request::Replay {
            id,
            consumer,
            category,
        },
        Command::Project { stream } => Request::Project { stream },
        Command::Services => Request::Services,
        Command::Run { .. }
        | Command::Inspect { .. }
        | Command::Replicas { .. }
        | Command::Test { .. }
        | Command::New { .. }
        | Command::Dev { .. }
        | Command::Rebuild { .. }
        | Command::Token { .. } => return None,
    })
}

fn kind_of(request: &Request) -> &'static str {
    match request {
        Request::Send { .. } => "send",
        Request::Read { .. } => "read",
        Request::Consumers { .. } => "consumers",
        Request::View { .. } => "view",
        Request::Parked => "parked",
        Request::Replay { .. } => "replay",
        Request::Project { .. } => "project",
        Request::Rebuild { .. } => "rebuild",
        Request::Services => "services",
    }
}

fn store_dir(data: &Path) -> PathBuf {
    data.join("store")
}

/// Where the mail capability delivers.
pub fn maildir(data: &Path) -> PathBuf {
    data.join("maildir")
}

fn cache_dir(data: &Path) -> PathBuf {
    data.join("cache")
}

async fn open_store(data: &Path, store: &StoreChoice) -> anyhow::Result<Arc<dyn MessageStore>> {
    open_store_with_cache(data, store, crate::store::DEFAULT_CACHE_BYTES).await
}

async fn open_store_with_cache(
    data: &Path,
    store: &StoreChoice,
    cache_bytes: u64,
) -> anyhow::Result<Arc<dyn MessageStore>> {
    std::fs::create_dir_all(data)
        .with_context(|| format!("cannot create the data folder {}", data.display()))?;
    Ok(match store {
        StoreChoice::Sled => Arc::new(SledStore::open_with_cache(store_dir(data), cache_bytes)?),
        StoreChoice::Nats(url) => Arc::new(NatsStore::connect(url).await?),
    })
}

/// Opens the store for `ferry run`. A CLI command that opened the sled folder while no host ran
/// holds it for a moment: wait for it rather than fail, but not for a host that keeps it.
async fn open_store_for_host(
    data: &Path,
    store: &StoreChoice,
    cache_bytes: u64,
) -> anyhow::Result<Arc<dyn MessageStore>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut told = false;
    loop {
        match open_store_with_cache(data, store, cache_bytes).await {
            Err(e)
                if matches!(
                    e.downcast_ref::<StoreError>(),
                    Some(StoreError::Locked { .. })
                ) && std::time::Instant::now() < deadline =>
            {
                if !told {
                    tracing::info!("the data folder is in use; waiting for it");
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// Runs a request in the running host when one listens on the sled folder, otherwise on the
/// store directly (always for JetStream, which any number of processes share). A host that is
/// starting holds the sled folder before it listens: wait for it a little.
async fn answer(
    data: &Path,
    services: &Path,
    store: &StoreChoice,
    request: Request,
) -> anyhow::Result<Value> {
    if matches!(store, StoreChoice::Nats(_)) {
        // What a host runs is known only to it: ask the one of this data folder, if any.
        if matches!(request, Request::Services)
            && let Some(answer) = control::try_remote(data, &request).await?
        {
            return Ok(answer);
        }
        return execute_locally(data, services, store, request).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(answer) = control::try_remote(data, &request).await? {
            return Ok(answer);
        }
        match execute_locally(data, services, store, request.clone()).await {
            Err(e)
                if matches!(
                    e.downcast_ref::<StoreError>(),
                    Some(StoreError::Locked { .. })
                ) && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

async fn execute_locally(
    data: &Path,
    services: &Path,
    store: &StoreChoice,
    request: Request,
) -> anyhow::Result<Value> {
    let store = open_store(data, store).await?;
    let mut components = Default::default();
    if matches!(request, Request::Project { .. } | Request::Services) {
        let runtime = Runtime::new(Some(cache_dir(data)))?;
        let (loaded, _) = service::load_folder(&runtime, services, Limits::default())?;
        components = ServiceTable::of(&service::admit(loaded).0);
    }
    let context = Context {
        store,
        services: components,
    };
    control::execute(&context, request).await
}

/// Everything `ferry run` is configured with besides its folders.
#[derive(Debug, Clone)]
pub struct HostSettings {
    pub store: StoreChoice,
    /// The embedded store's page cache (unused on JetStream).
    pub store_cache_bytes: u64,
    /// The gateway's address and settings, when it runs.
    pub http: Option<(String, GatewayConfig)>,
    /// Run only these services (all when empty).
    pub only: Vec<String>,
    /// Default limits of every service.
    pub limits: Limits,
    /// Per-service overrides.
    pub service_limits: Vec<ServiceLimit>,
    pub config: RunnerConfig,
    pub capabilities: Capabilities,
}

/// One `--service-limit` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceLimit {
    TimeoutMs(String, u64),
    MemoryMib(String, usize),
}

fn parse_service_limit(text: &str) -> Result<ServiceLimit, String> {
    let usage = || format!("{text:?}: expected SERVICE:timeout-ms=N or SERVICE:memory-mib=N");
    let (service, setting) = text.split_once(':').ok_or_else(usage)?;
    crate::store::validate_service_name(service).map_err(|e| e.to_string())?;
    let (key, value) = setting.split_once('=').ok_or_else(usage)?;
    let number = |value: &str| value.parse::<u64>().map_err(|_| usage());
    match key {
        "timeout-ms" => Ok(ServiceLimit::TimeoutMs(
            service.into(),
            number(value)?.max(1),
        )),
        "memory-mib" => Ok(ServiceLimit::MemoryMib(
            service.into(),
            usize::try_from(number(value)?.max(1)).map_err(|_| usage())?,
        )),
        _ => Err(usage()),
    }
}

fn apply_service_limits(defaults: Limits, service: &str, settings: &[ServiceLimit]) -> Limits {
    settings
        .iter()
        .fold(defaults, |limits, setting| match setting {
            ServiceLimit::TimeoutMs(name, ms) if name == service => Limits {
                call_timeout: Duration::from_millis(*ms),
                ..limits
            },
            ServiceLimit::MemoryMib(name, mib) if name == service => Limits {
                memory_bytes: mib.saturating_mul(1024 * 1024),
                ..limits
            },
            _ => limits,
        })
}

/// Where a rebuild runs: in the running host, or in this process.
enum Rebuilder<'a> {
    Host(&'a Path),
    Here(&'a Context),
}

impl Rebuilder<'_> {
    async fn consumers(&self) -> anyhow::Result<Vec<crate::store::ConsumerInfo>> {
        let request = Request::Consumers { category: None };
        let answer = match self {
            Self::Host(data) => control::try_remote(data, &request)
                .await?
                .context("the host stopped during the rebuild")?,
            Self::Here(context) => control::execute(context, request).await?,
        };
        Ok(serde_json::from_value(answer["consumers"].clone())?)
    }
}

/// `ferry rebuild TABLE`.
async fn rebuild(
    data: &Path,
    services: &Path,
    store: &StoreChoice,
    table: String,
    json: bool,
) -> anyhow::Result<()> {
    let request = Request::Rebuild { table };
    if *store == StoreChoice::Sled
        && let Some(answer) = control::try_remote(data, &request).await?
    {
        return follow_rebuild(&Rebuilder::Host(data), &answer, json).await;
    }
    let store = open_store(data, store).await?;
    let runtime = Runtime::new(Some(cache_dir(data)))?;
    let (loaded, _) = service::load_folder(&runtime, services, Limits::default())?;
    let admitted = service::admit(loaded).0;
    let context = Context {
        store: store.clone(),
        services: ServiceTable::of(&admitted),
    };
    let answer = control::execute(&context, request).await?;
    let owner = admitted
        .iter()
        .find(|s| answer["service"] == s.component.manifest().name.as_str())
        .context("the rebuilt service is not loaded")?;
    // Only the event subscriptions run, with no capabilities: a rebuild must not send anything.
    let running = Running::start_subscriptions(
        store,
        owner,
        RunnerConfig::default(),
        &Capabilities::default(),
    )?;
    let result = follow_rebuild(&Rebuilder::Here(&context), &answer, json).await;
    running.shutdown().await;
    result
}

/// Shows the rebuild's progress until its consumers have caught up.
async fn follow_rebuild(
    rebuilder: &Rebuilder<'_>,
    answer: &Value,
    json: bool,
) -> anyhow::Result<()> {
    let ids: Vec<crate::store::ConsumerId> = serde_json::from_value(answer["consumers"].clone())?;
    let remaining = |infos: &[crate::store::ConsumerInfo]| -> u64 {
        infos
            .iter()
            .filter(|info| ids.contains(&info.consumer))
            // Deferred messages are not counted: one not due yet would hold the rebuild up.
            .map(|info| info.lag)
            .sum()
    };
    let total = answer["events"].as_u64().unwrap_or(0);
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template(
            "rebuilding {msg} [{bar:40}] {pos}/{len} events ({per_sec}, {eta} left)",
        )?
        .progress_chars("=> "),
    );
    bar.set_message(answer["views"].to_string());
    let mut last_line = std::time::Instant::now();
    loop {
        let left = remaining(&rebuilder.consumers().await?);
        let done = total.saturating_sub(left);
        bar.set_position(done);
        if bar.is_hidden() && !json && (left == 0 || last_line.elapsed() >= Duration::from_secs(1))
        {
            // Not a terminal: a line per second instead of a bar.
            eprintln!("rebuilding {}: {done}/{total} events", answer["views"]);
            last_line = std::time::Instant::now();
        }
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish();
    let summary = serde_json::json!({ "rebuilt": answer["views"], "service": answer["service"], "events": total });
    if json {
        println!("{summary}");
    } else {
        println!("rebuilt {} from {total} events", answer["views"]);
    }
    Ok(())
}

/// `ferry run`: opens the store, loads and admits the services, starts their consumers and the
/// control socket, and runs until SIGINT or SIGTERM.
pub async fn run(data: &Path, services: &Path, settings: &HostSettings) -> anyhow::Result<()> {
    let HostSettings {
        store,
        store_cache_bytes,
        http,
        only,
        limits,
        service_limits,
        config,
        capabilities,
    } = settings;
    let store = open_store_for_host(data, store, *store_cache_bytes).await?;
    std::fs::create_dir_all(services)
        .with_context(|| format!("cannot create the services folder {}", services.display()))?;
    let (defaults, service_limits) = (*limits, service_limits.clone());
    let reloader = Reloader {
        folder: services.to_path_buf(),
        runtime: Runtime::new(Some(cache_dir(data)))?,
        limits: *limits,
        only: only.clone(),
        prepare: Arc::new(move |mut service: LoadedService| {
            let name = service.component.manifest().name.clone();
            let own = apply_service_limits(defaults, &name, &service_limits);
            if own != defaults {
                tracing::info!(service = %name, ?own, "service limits");
                service.component = service.component.with_limits(own);
            }
            service
        }),
    };
    // The folder is read once now, then again after every change to it.
    let mut running = Running::start(store.clone(), &[], *config, capabilities)?;
    reload::sync(&reloader, &mut running).await?;
    let context = Arc::new(Context {
        store,
        services: running.table(),
    });
    let count = context.services.list().len();
    let running = Arc::new(tokio::sync::Mutex::new(running));
    let watcher = reload::watch(reloader, running.clone())?;
    let gateway = match http {
        Some((address, config)) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address}"))?;
            Some(gateway::serve(listener, context.clone(), config.clone())?)
        }
        None => None,
    };
    let server = control::serve(data, context).await?;
    tracing::info!(services = count, data = %data.display(), "ferry is running");
    wait_for_signal().await?;
    tracing::info!("stopping");
    server.abort();
    if let Some(gateway) = gateway {
        gateway.abort();
    }
    watcher.abort();
    let _ = watcher.await;
    match Arc::try_unwrap(running) {
        Ok(running) => running.into_inner().shutdown().await,
        Err(_) => tracing::warn!("the reloader still held the services; stopping without waiting"),
    }
    let _ = std::fs::remove_file(control::socket_path(data));
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

/// Loaded services, for callers that wire the parts themselves (tests, benchmarks).
pub fn load_services(
    runtime: &Runtime,
    services: &Path,
    limits: Limits,
) -> anyhow::Result<Vec<LoadedService>> {
    let (loaded, failed) = service::load_folder(runtime, services, limits)?;
    if let Some((path, error)) = failed.into_iter().next() {
        return Err(error.context(format!("{} cannot run", path.display())));
    }
    Ok(service::admit(loaded).0)
}
