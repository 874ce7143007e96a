//! `ferry run`: the host's settings, per-service limits, and the wiring of store, services,
//! reload, control socket and gateway until a signal.

use super::*;

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

pub(super) fn parse_service_limit(text: &str) -> Result<ServiceLimit, String> {
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

pub(super) fn apply_service_limits(
    defaults: Limits,
    service: &str,
    settings: &[ServiceLimit],
) -> Limits {
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

pub(super) async fn wait_for_signal() -> anyhow::Result<()> {
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
