//! Soak run: the host with the `counter` service under a steady command rate for several minutes,
//! printing, per window, what was handled, latency from command commit to event commit, and the
//! process's resident memory. Flat memory and steady latency are the goal.
//!
//! ```sh
//! (cd guests && cargo build --release --target wasm32-wasip2)
//! cargo run --example soak -- --seconds 240 --rate 200
//! cargo run --example soak -- --seconds 240 --rate 100 --nats   # the store in a nats-server
//! ```
//!
//! With `--nats` the messages live in another process (a `nats-server` the run starts), so the
//! resident memory printed is Ferry's own: the host, the runtime and the guests, without the
//! embedded store's page cache.

#[path = "measure/mod.rs"]
mod measure;
// The tests' nats-server launcher.
#[allow(dead_code)]
#[path = "../tests/support/nats.rs"]
mod nats_server;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ferry::service::{Capabilities, LoadedService, RunnerConfig, Running};
use ferry::store::{
    Category, Commit, ConsumerId, MessageStore, NatsStore, NewMessage, SledStore, StreamName,
};
use ferry::wasm::{Limits, Runtime};
use measure::{folder_bytes, percentile, resident_mib};

/// Where the tests' nats-server helper looks for the binary.
fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let seconds = arg("--seconds", 180);
    let rate = arg("--rate", 200).max(1);
    let window = Duration::from_secs(arg("--window", 15));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let component = root.join("guests/target/wasm32-wasip2/release/counter.wasm");
    let dir = tempfile::tempdir()?;
    // A small page cache, so that resident memory shows growth per message rather than sled
    // filling its cache (256 MiB by default).
    let cache_mib = arg("--sled-cache-mib", 16);
    let nats = std::env::args().any(|a| a == "--nats");
    let mut _server = None;
    let store: Arc<dyn MessageStore> = if nats {
        let server = nats_server::NatsServer::try_start().map_err(|e| anyhow::anyhow!(e))?;
        let store = NatsStore::connect(&server.url()).await?;
        _server = Some(server);
        Arc::new(store)
    } else {
        Arc::new(SledStore::open_with_cache(
            dir.path().join("store"),
            cache_mib * 1024 * 1024,
        )?)
    };
    let runtime = Runtime::new(Some(dir.path().join("cache")))?;
    let loaded = LoadedService {
        component: runtime
            .load_file(&component, Limits::default())
            .with_context(|| format!("build the guests first: {}", component.display()))?,
        path: component,
    };
    let running = Running::start(
        store.clone(),
        &[loaded],
        RunnerConfig::default(),
        &Capabilities::default(),
    )?;

    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    // Observer: follows the counter category and matches each event to its command.
    let observer = {
        let (store, sent_at, latencies) = (store.clone(), sent_at.clone(), latencies.clone());
        tokio::spawn(async move {
            let category = Category::parse("counter").expect("category");
            let observer = ConsumerId::new(category.clone(), "soak-observer");
            let mut after = 0;
            loop {
                let Ok(mut changes) = store.watch(&observer).await else {
                    return;
                };
                let page = match store
                    .read_category(
                        &category,
                        after,
                        &ferry::store::CategoryFilter::default(),
                        1000,
                    )
                    .await
                {
                    Ok(page) => page,
                    Err(_) => return,
                };
                let now = Instant::now();
                for event in &page.messages {
                    let cause = event.metadata.get("causationId").and_then(|v| v.as_str());
                    if let Some(sent) = cause.and_then(|c| sent_at.lock().ok()?.remove(c))
                        && let Ok(mut l) = latencies.lock()
                    {
                        l.push(now - sent);
                    }
                }
                after = page.scanned_to;
                if page.messages.is_empty() {
                    let _ = changes.changed().await;
                }
            }
        })
    };

    let store_name = if nats {
        "JetStream (nats-server in another process)".to_owned()
    } else {
        format!("sled, page cache {cache_mib} MiB")
    };
    println!(
        "soak: {rate} commands/s for {seconds} s, {store_name}, counter guest, fresh instance \
         per message"
    );
    println!(
        "| {:>6} | {:>8} | {:>8} | {:>9} | {:>9} | {:>9} | {:>8} | {:>9} |",
        "t (s)", "sent", "handled", "p50 (ms)", "p99 (ms)", "max (ms)", "RSS MiB", "store MiB"
    );
    println!(
        "|-------:|---------:|---------:|----------:|----------:|----------:|---------:|----------:|"
    );
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut next = start;
    let mut next_report = start + window;
    let (mut sent, mut handled) = (0u64, 0u64);
    while start.elapsed() < Duration::from_secs(seconds) {
        let id = format!("soak-{sent}");
        let stream = StreamName::parse(&format!("counter:command.e{}", sent % 100))?;
        sent_at
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .insert(id.clone(), Instant::now());
        let store = store.clone();
        tokio::spawn(async move {
            let command = NewMessage {
                id,
                message_type: "Increment".into(),
                data: serde_json::json!({ "by": 1 }),
                metadata: Default::default(),
                not_before_ms: None,
            };
            let _ = store
                .commit(Commit::append(stream, None, vec![command]))
                .await;
        });
        sent += 1;
        next += interval;
        tokio::time::sleep_until(next.into()).await;
        if Instant::now() >= next_report {
            let mut window_latencies =
                std::mem::take(&mut *latencies.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
            handled += window_latencies.len() as u64;
            window_latencies.sort();
            println!(
                "| {:>6} | {:>8} | {:>8} | {:>9.2} | {:>9.2} | {:>9.2} | {:>8.1} | {:>9.1} |",
                start.elapsed().as_secs(),
                sent,
                handled,
                percentile(&window_latencies, 0.5).as_secs_f64() * 1e3,
                percentile(&window_latencies, 0.99).as_secs_f64() * 1e3,
                window_latencies
                    .last()
                    .copied()
                    .unwrap_or_default()
                    .as_secs_f64()
                    * 1e3,
                resident_mib(),
                folder_bytes(&dir.path().join("store")) as f64 / (1024.0 * 1024.0)
            );
            next_report += window;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    observer.abort();
    running.shutdown().await;
    let pending = sent_at.lock().map(|m| m.len()).unwrap_or(0);
    println!("done: {sent} sent, {pending} not seen handled within 2 s of the end");
    Ok(())
}
