//! Long history: fills an embedded (sled) store with millions of messages through the real
//! write path (commands appended, the `counter` service handling each into an event, its
//! position and projection), and reports at checkpoints what a lifetime of history costs:
//! resident memory, store bytes per message, then restart time and the first command on an
//! entity with a long history.
//!
//! ```sh
//! (cd guests && cargo build --release --target wasm32-wasip2)
//! cargo run --release --example history -- --messages 5000000
//! cargo run --release --example history --features heap-profile -- --messages 1000000
//! ```
//!
//! `--long-entity N` (default 100000) commands go to one entity first, so that it has N events;
//! the rest are spread over `--entities` (default 10000). With `--features heap-profile` the
//! process runs under dhat: each checkpoint prints the live heap, and `dhat-heap.json` (open it
//! in dhat's viewer) names what holds it at the largest.

// Only some of the shared measures are used here.
#[allow(dead_code)]
#[path = "measure/mod.rs"]
mod measure;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ferry::service::{Capabilities, LoadedService, RunnerConfig, Running};
use ferry::store::{Category, Commit, ConsumerId, MessageStore, NewMessage, SledStore, StreamName};
use ferry::wasm::{Limits, Runtime};
use measure::{folder_bytes, resident_mib};

#[cfg(feature = "heap-profile")]
#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

// The allocator of the `ferry` binary, so resident sizes are the product's.
#[cfg(not(feature = "heap-profile"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn live_heap_mib() -> Option<f64> {
    #[cfg(feature = "heap-profile")]
    {
        let stats = dhat::HeapStats::get();
        Some(stats.curr_bytes as f64 / (1024.0 * 1024.0))
    }
    #[cfg(not(feature = "heap-profile"))]
    None
}

fn increment(id: String) -> NewMessage {
    NewMessage {
        id,
        message_type: "Increment".into(),
        data: serde_json::json!({ "by": 1 }),
        metadata: Default::default(),
        not_before_ms: None,
    }
}

fn command_consumer() -> anyhow::Result<ConsumerId> {
    Ok(ConsumerId::new(
        Category::parse("counter:command")?,
        "microservice:counter",
    ))
}

/// The counter host on a sled folder: store, runtime (with its code cache) and the service.
struct Host {
    store: Arc<dyn MessageStore>,
    sled: SledStore,
    running: Running,
}

/// Starts the host; also returns how long opening the store took.
fn start(dir: &Path, cache_bytes: u64) -> anyhow::Result<(Host, Duration)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let component = root.join("guests/target/wasm32-wasip2/release/counter.wasm");
    let opening = Instant::now();
    let sled = SledStore::open_with_cache(dir.join("store"), cache_bytes)?;
    let opened = opening.elapsed();
    let store: Arc<dyn MessageStore> = Arc::new(sled.clone());
    let runtime = Runtime::new(Some(dir.join("cache")))?;
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
    Ok((
        Host {
            store,
            sled,
            running,
        },
        opened,
    ))
}

/// Appends `count` commands from 32 writers, entity `entity(n)` for the n-th, and waits until
/// the service has handled them all.
async fn fill(
    store: &Arc<dyn MessageStore>,
    first: u64,
    count: u64,
    entity: impl Fn(u64) -> String + Send + Sync + Clone + 'static,
) -> anyhow::Result<()> {
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..32 {
        let (store, entity) = (store.clone(), entity.clone());
        writers.spawn(async move {
            let mut last = 0;
            for n in (first + writer..first + count).step_by(32) {
                let stream = StreamName::parse(&format!("counter:command.{}", entity(n)))?;
                let written = store
                    .commit(Commit::append(
                        stream,
                        None,
                        vec![increment(format!("h{n}"))],
                    ))
                    .await?;
                last = last.max(written.written.first().map_or(0, |m| m.global_position));
            }
            anyhow::Ok(last)
        });
    }
    let mut last = 0;
    while let Some(written) = writers.join_next().await {
        last = last.max(written??);
    }
    wait_handled(store, last).await
}

async fn wait_handled(store: &Arc<dyn MessageStore>, global: u64) -> anyhow::Result<()> {
    let consumer = command_consumer()?;
    while store.settled(&consumer).await? < global {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Appends one command to `entity` and waits for its event: the time to handle it.
async fn first_command(store: &Arc<dyn MessageStore>, entity: &str) -> anyhow::Result<Duration> {
    let stream = StreamName::parse(&format!("counter:command.{entity}"))?;
    let events = StreamName::parse(&format!("counter.{entity}"))?;
    let before = store.stream_version(&events).await?;
    let started = Instant::now();
    store
        .commit(Commit::append(
            stream,
            None,
            vec![increment(format!(
                "first-{entity}-{}",
                uuid::Uuid::new_v4()
            ))],
        ))
        .await?;
    while store.stream_version(&events).await? == before {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(started.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    #[cfg(feature = "heap-profile")]
    let _profiler = dhat::Profiler::new_heap();
    let messages = arg("--messages", 1_000_000);
    let long_entity = arg("--long-entity", 100_000);
    let entities = arg("--entities", 10_000).max(1);
    let cache_mib = arg("--store-cache-mib", ferry::store::DEFAULT_CACHE_BYTES >> 20);
    let cache_bytes = cache_mib << 20;
    // `--dir PATH` keeps the filled folder (to look at it, or to time restarts again).
    let kept = std::env::args()
        .skip_while(|a| a != "--dir")
        .nth(1)
        .map(std::path::PathBuf::from);
    let temporary = tempfile::tempdir()?;
    let dir = kept.unwrap_or_else(|| temporary.path().to_owned());
    // Each handled command stores two messages: the command and its event.
    let mut checkpoints: Vec<u64> = [100_000, 500_000, 1_000_000, 2_000_000, 5_000_000]
        .into_iter()
        .filter(|&c| c < messages)
        .collect();
    checkpoints.push(messages);

    println!(
        "history: {messages} messages (commands and their events), counter guest, sled page \
         cache {cache_mib} MiB, {} core(s)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| messages | commands/s | RSS MiB | live heap MiB | store MiB | store bytes/message |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let (host, _) = start(&dir, cache_bytes)?;
    let mut commands = 0;
    // The long entity first, so that everything after it is written on top of its history.
    let long = long_entity.min(messages / 2);
    let mut stored = 0;
    // `--restart-only` (with `--dir` of an earlier run and its arguments) times the restart alone.
    let restart_only = std::env::args().any(|a| a == "--restart-only");
    if restart_only {
        checkpoints.clear();
        commands = messages / 2;
    }
    for checkpoint in checkpoints {
        let started = Instant::now();
        let want = checkpoint.saturating_sub(stored) / 2;
        let on_long = long.saturating_sub(commands).min(want);
        if on_long > 0 {
            fill(&host.store, commands, on_long, |_| "long".to_owned()).await?;
        }
        let spread = want - on_long;
        fill(&host.store, commands + on_long, spread, move |n| {
            format!("e{}", n % entities)
        })
        .await?;
        commands += want;
        stored = host.store.head().await?;
        let rate = want as f64 / started.elapsed().as_secs_f64();
        // Let the writer's last flush and the consumers settle before measuring.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let bytes = folder_bytes(&dir.join("store"));
        println!(
            "| {stored} | {rate:.0} | {:.1} | {} | {:.1} | {:.0} |",
            resident_mib(),
            live_heap_mib().map_or("-".to_owned(), |mib| format!("{mib:.1}")),
            bytes as f64 / (1 << 20) as f64,
            bytes as f64 / stored.max(1) as f64,
        );
    }
    // `--account`: where the logical bytes are, by kind of record (a full scan of the store).
    if std::env::args().any(|a| a == "--account") {
        let file_bytes = folder_bytes(&dir.join("store"));
        let account = host.sled.account()?;
        let logical: u64 = account.iter().map(|a| a.key_bytes + a.value_bytes).sum();
        println!();
        println!("| record | count | key bytes | value bytes | bytes per record |");
        println!("|---|---:|---:|---:|---:|");
        for kind in &account {
            println!(
                "| `{}` | {} | {} | {} | {:.0} |",
                kind.tag,
                kind.records,
                kind.key_bytes,
                kind.value_bytes,
                (kind.key_bytes + kind.value_bytes) as f64 / kind.records.max(1) as f64
            );
        }
        println!("| all sled records | | | {logical} | |",);
        let log = host.sled.log_account()?;
        println!(
            "| message log: {} segment(s) | {stored} messages | | {} | {:.0} |",
            log.segments,
            log.segment_bytes,
            log.segment_bytes as f64 / stored.max(1) as f64
        );
        println!(
            "| message index: {} run(s), {} in memory | {} entries | | {} | {:.0} |",
            log.runs,
            log.entries_in_memory,
            log.run_entries,
            log.run_bytes,
            log.run_bytes as f64 / log.run_entries.max(1) as f64
        );
        println!("| all files | | | {file_bytes} | |");
    }
    let Host {
        store,
        sled,
        running,
    } = host;
    running.shutdown().await;
    drop((store, sled));

    // Restart: open the folder and start the service, as `ferry run` does.
    let started = Instant::now();
    let (host, opened) = start(&dir, cache_bytes)?;
    let restart = started.elapsed();
    let first_long = first_command(&host.store, "long").await?;
    let first_short = first_command(&host.store, "e1").await?;
    let again_long = first_command(&host.store, "long").await?;
    println!();
    println!("| after a restart | time |");
    println!("|---|---:|");
    println!("| open the store and start the service | {restart:.2?} |");
    println!("| of which opening the store | {opened:.2?} |");
    println!("| first command on an entity with {long} events | {first_long:.2?} |");
    println!(
        "| first command on an entity with ~{} events | {first_short:.2?} |",
        (commands - long) / entities
    );
    println!("| the next command on the long entity | {again_long:.2?} |");
    host.running.shutdown().await;
    Ok(())
}
