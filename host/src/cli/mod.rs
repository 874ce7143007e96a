//! The `ferry` command line. This file runs each subcommand: a store request through the running
//! host's socket or on the store itself, `inspect`, `new`, `dev`, `test`, `replicas`. The
//! arguments are in `args`, `ferry run`'s wiring in `host`, `rebuild` with its progress in
//! `rebuild`, the readable (or `--json`) answers in `render`. `main.rs` only calls [`main`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::control::{self, Context, Request};
use crate::gateway::{self, GatewayConfig};

mod args;
mod host;
mod http;
mod new;
mod rebuild;
mod render;
mod store;

pub use self::args::{Cli, Command, StoreAction, StoreChoice};
use self::host::parse_service_limit;
pub use self::host::{HostSettings, ServiceLimit, load_services, run};
use self::rebuild::rebuild;

pub use self::http::HttpArgs;
use crate::reload::{self, Reloader};
use crate::service::{self, Capabilities, LoadedService, RunnerConfig, Running, ServiceTable};
use crate::store::{MessageStore, NatsStore, SledStore, StoreError};
use crate::wasm::{Limits, Runtime};

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
            mail,
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
            let capabilities = mail.capabilities(&cli.data)?;
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
        Command::Dev { sources, mail } => {
            let settings = HostSettings {
                store: cli.store,
                store_cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
                only: Vec::new(),
                http: None,
                limits: Limits::default(),
                service_limits: Vec::new(),
                config: RunnerConfig::default(),
                capabilities: mail.capabilities(&cli.data)?,
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
        Command::Store { action } => store::run(&cli.data, &cli.store, action, cli.json),
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
        | Command::Store { .. }
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
    crate::files::private_folder(data).context("the data folder")?;
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
