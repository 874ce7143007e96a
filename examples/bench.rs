//! The benchmark program: one run, one table. Each row is the median over several rounds, except
//! row 0 (the machine's pauses), which is one window.
//!
//! ```sh
//! (cd guests && cargo build --release --target wasm32-wasip2)
//! cargo run --example bench            # a few minutes on a 2-core machine
//! cargo run --example bench -- --quick # CI: checks that it runs
//! ```
//!
//! Rows: the raw store's durable append rate (row 1), end-to-end durable command throughput and
//! latency through the `counter` guest (with the ratio to row 1), the Wasm cost per message, cold
//! start, resident memory, and one service as 1, 2 and 3 processes on JetStream; row 0, just before the latency rows, the longest pause of the
//! machine's cores. Rows 1 and 2 run on sled and, when `nats-server` is found (as in
//! the tests: `FERRY_NATS_SERVER`, `.tools/venv`, `PATH`), on a JetStream it starts with
//! `sync_interval: always`, so both stores are durable on disk before they acknowledge; and on a
//! namespace kept by three servers of a cluster it starts the same way, with the failover gap.

// The allocator the `ferry` binary uses, so the in-process rows measure the host as shipped.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// Only some of the shared measures are used here.
#[allow(dead_code)]
#[path = "measure/mod.rs"]
mod measure;
// The tests' nats-server launcher; the benchmark only starts a server.
#[path = "bench/disk.rs"]
mod disk;
use disk::{CommitPoint, raw_fdatasync_appends, raw_group_commits, raw_sled_appends};
#[path = "bench/instances.rs"]
mod instances;
#[path = "bench/jetstream.rs"]
mod jetstream;
#[path = "bench/latency.rs"]
mod latency;
#[path = "bench/native.rs"]
mod native;
#[allow(dead_code)]
#[path = "../tests/support/nats.rs"]
mod nats;
// The tests' cluster launcher: three routed servers for the replicated rows.
#[allow(dead_code)]
#[path = "../tests/support/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "../tests/support/delay.rs"]
mod delay;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::watch;

use ferry::mail::{Maildir, Transport};
use ferry::service::{Capabilities, LoadedService, RunnerConfig, Running};
use ferry::store::{
    Category, Commit, ConsumerId, Group, Message, MessageStore, NatsStore, NewMessage, SledStore,
    StreamName, partition_of,
};
use ferry::wasm::{
    GuestError, GuestHost, Limits, Manifest, NativeService, Outcome, Outgoing, Runtime,
    ServiceComponent,
};
use jetstream::JetStream;
use latency::*;
use measure::{percentile, resident_mib};
use native::NativeCounter;

struct NullHost;

impl GuestHost for NullHost {
    fn read_stream(&mut self, _: &str, _: u64) -> Result<Vec<Message>, String> {
        Ok(Vec::new())
    }
    fn view_get(&mut self, _: &str, _: &str) -> Result<Option<String>, String> {
        Ok(None)
    }
    fn new_id(&mut self, name: &str) -> String {
        name.to_owned()
    }
    fn deliver_email(&mut self, _: &str, _: &str) -> Result<(), String> {
        Err("no mail here".into())
    }
    fn secret(&mut self, _: &str) -> Result<String, String> {
        Err("no secrets here".into())
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn guest(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../guests/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"))
}

fn command(id: String, by: i64) -> NewMessage {
    NewMessage {
        id,
        message_type: "Increment".into(),
        data: serde_json::json!({ "by": by, "note": "x".repeat(160) }),
        metadata: Default::default(),
        not_before_ms: None,
    }
}

fn sample_message() -> Message {
    Message {
        id: "m-1".into(),
        stream: StreamName::parse("counter:command.e1").expect("valid"),
        message_type: "Increment".into(),
        data: serde_json::json!({ "by": 1, "note": "x".repeat(160) }),
        metadata: Default::default(),
        position: 0,
        global_position: 1,
        time_ms: 0,
        not_before_ms: None,
    }
}

struct Table {
    rows: Vec<(String, String, String)>,
}

impl Table {
    fn row(&mut self, what: &str, value: String, note: String) {
        eprintln!("  {what}: {value} {note}");
        self.rows.push((what.into(), value, note));
    }

    fn print(&self) {
        println!("| measurement | median | note |");
        println!("|---|---:|---|");
        for (what, value, note) in &self.rows {
            println!("| {what} | {value} | {note} |");
        }
    }
}

/// Where the tests' nats-server helper looks for the binary.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

static NAMESPACES: AtomicUsize = AtomicUsize::new(0);

/// The store rows 2 run on.
#[derive(Clone)]
enum Backend {
    Sled,
    /// A server or cluster; every run gets a namespace of its own.
    Nats(JetStream),
}

impl Backend {
    async fn open(&self, dir: &Path) -> anyhow::Result<Arc<dyn MessageStore>> {
        Ok(match self {
            Self::Sled => Arc::new(SledStore::open(dir.join("store"))?),
            Self::Nats(on) => {
                let n = NAMESPACES.fetch_add(1, Ordering::Relaxed);
                let url = format!("{}/bench{n}?replicas={}", on.servers, on.replicas);
                Arc::new(NatsStore::connect(&url).await?)
            }
        })
    }
}

/// Who handles the benchmark's commands.
#[derive(Clone, Copy, PartialEq)]
enum Handler {
    Wasm,
    Native,
}

async fn start_counter(
    dir: &std::path::Path,
    backend: &Backend,
    config: RunnerConfig,
    handler: Handler,
) -> anyhow::Result<(Arc<dyn MessageStore>, Running)> {
    let store = backend.open(dir).await?;
    let runtime = Runtime::new(Some(dir.join("cache")))?;
    let path = guest("counter_commands");
    let component = match handler {
        Handler::Wasm => runtime.load_file(&path, Limits::default())?,
        Handler::Native => ServiceComponent::native(Arc::new(NativeCounter)),
    };
    let running = Running::start(
        store.clone(),
        &[LoadedService { path, component }],
        config,
        &Capabilities::default(),
    )?;
    Ok((store, running))
}

/// Wakes after every durable write of an event (the outcome and the consumer's position are
/// written together), so a wait ends as soon as its command is handled, not at the next poll.
/// The command consumer's position, read once per write to the events' category and shared by
/// every waiter: a read per waiting command would load the store with the benchmark's own reads
/// (on JetStream each is a round trip to the server).
/// The counter's command consumer's group (each partition's position), read again on every
/// write to the counter's category.
async fn handled_position(
    store: &Arc<dyn MessageStore>,
) -> anyhow::Result<watch::Receiver<Option<Group>>> {
    let mut changes = store
        .watch(&ConsumerId::new(Category::parse("counter")?, "bench"))
        .await?;
    let consumer = ConsumerId::new(Category::parse("counter:command")?, "microservice:counter");
    let (position, handled) = watch::channel(None);
    let store = store.clone();
    tokio::spawn(async move {
        loop {
            changes.borrow_and_update();
            let Ok(now) = store.group(&consumer).await else {
                return;
            };
            position.send_replace(now);
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = position.closed() => return,
            }
        }
    });
    Ok(handled)
}

/// Waits until the command at `global` in entity `entity`'s command stream is handled: its
/// partition's position is at or past it.
async fn wait_handled(
    mut handled: watch::Receiver<Option<Group>>,
    entity: &str,
    global: u64,
) -> anyhow::Result<()> {
    handled
        .wait_for(|group| {
            group.as_ref().is_some_and(|group| {
                let partition = partition_of(entity, group.spec.partitions) as usize;
                group
                    .positions
                    .get(partition)
                    .is_some_and(|p| p.position >= global)
            })
        })
        .await?;
    Ok(())
}

/// Row 2: commands appended by 32 concurrent writers while the host handles them; the rate at
/// which they are handled to the end (outcome and position durable).
async fn end_to_end_throughput(
    backend: &Backend,
    commands: usize,
    config: RunnerConfig,
    handler: Handler,
) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let (store, running) = start_counter(dir.path(), backend, config, handler).await?;
    let handled = handled_position(&store).await?;
    let start = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..32 {
        let store = store.clone();
        writers.spawn(async move {
            let mut last = std::collections::HashMap::new();
            for n in (writer..commands).step_by(32) {
                let entity = format!("e{}", n % 100);
                let stream = format!("counter:command.{entity}");
                let global = append(store.as_ref(), &stream, format!("c{n}")).await?;
                last.insert(entity, global);
            }
            anyhow::Ok(last)
        });
    }
    let mut last = std::collections::HashMap::new();
    while let Some(result) = writers.join_next().await {
        for (entity, global) in result?? {
            let at: &mut u64 = last.entry(entity).or_default();
            *at = (*at).max(global);
        }
    }
    for (entity, global) in last {
        wait_handled(handled.clone(), &entity, global).await?;
    }
    let rate = commands as f64 / start.elapsed().as_secs_f64();
    running.shutdown().await;
    Ok(rate)
}

/// The article's services, loaded (from the runtime's cache when it has them).
fn article_services(runtime: &Runtime) -> anyhow::Result<Vec<LoadedService>> {
    ["user", "email", "subscription", "user_aggregator"]
        .into_iter()
        .map(|name| {
            let path = guest(name);
            Ok(LoadedService {
                component: runtime.load_file(&path, Limits::default())?,
                path,
            })
        })
        .collect()
}

/// Row 5: the host's resident size before its services, idle with the article's four, and while
/// they handle registrations (each a command, events, an email and view rows across services).
/// Runs first, so the process holds nothing else yet.
async fn memory_rows(table: &mut Table, registrations: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let before = resident_mib();
    let store: Arc<dyn MessageStore> = Arc::new(SledStore::open(dir.path().join("store"))?);
    let runtime = Runtime::new(Some(dir.path().join("cache")))?;
    // The precompiled cache is filled by a child process, as a restarted host finds it, so the
    // compiler's memory is not counted here.
    let warmed = std::process::Command::new(std::env::current_exe()?)
        .arg("--warm-cache")
        .arg(dir.path().join("cache"))
        .status()?;
    anyhow::ensure!(warmed.success(), "the cache-warming run failed");
    let empty = resident_mib();
    let services = article_services(&runtime)?;
    let capabilities = Capabilities {
        mail: Some(Arc::new(Transport::Maildir(Maildir::new(
            dir.path().join("maildir"),
        )))),
        mail_grants: vec!["email".into()],
    };
    let running = Running::start(
        store.clone(),
        &services,
        RunnerConfig::default(),
        &capabilities,
    )?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle = resident_mib();
    let mut peak = idle;
    let mut last = 0;
    for n in 0..registrations {
        let data = serde_json::json!({
            "username": format!("user{n}"), "email": format!("user{n}@example.com"),
            "password": "correct horse", "firstName": "Ann", "lastName": "Lee",
        });
        let written = store
            .commit(Commit::append(
                StreamName::parse(&format!("user:command.u{n}"))?,
                None,
                vec![NewMessage {
                    id: format!("r{n}"),
                    message_type: "RegisterUser".into(),
                    data,
                    metadata: Default::default(),
                    not_before_ms: None,
                }],
            ))
            .await?;
        last = written.written.first().map_or(last, |m| m.global_position);
        if n % 50 == 0 {
            peak = peak.max(resident_mib());
        }
    }
    // Registered when the aggregator's users view has the last one.
    let aggregator = ConsumerId::new(Category::parse("user")?, "microservice:user-aggregator");
    let deadline = Instant::now() + Duration::from_secs(300);
    while store.settled(&aggregator).await? < last && Instant::now() < deadline {
        peak = peak.max(resident_mib());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.shutdown().await;
    table.row(
        "5. resident memory, host with no services",
        format!("{:.1} MiB", empty),
        format!("store open, engine ready; {before:.1} MiB before"),
    );
    table.row(
        "5. resident memory, idle with the article's 4 services",
        format!("{idle:.1} MiB"),
        format!(
            "{:.1} MiB per service",
            (idle - empty) / services.len() as f64
        ),
    );
    table.row(
        &format!("5. resident memory under load ({registrations} registrations)"),
        format!("{peak:.1} MiB"),
        "peak; the store's page cache grows with the data".into(),
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(cache) = args.iter().position(|a| a == "--warm-cache") {
        let cache = args.get(cache + 1).context("--warm-cache DIR")?;
        article_services(&Runtime::new(Some(cache.into()))?)?;
        return Ok(());
    }
    let quick = args.iter().any(|a| a == "--quick");
    // `--only sled,wasm`: run only these sections (sled, jetstream, cluster, wasm, start, memory,
    // instances).
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(str::to_owned).collect());
    let runs = |section: &str| only.as_ref().is_none_or(|o| o.iter().any(|s| s == section));
    let (rounds, appends, commands) = if quick {
        (1, 200, 200)
    } else {
        (5, 3000, 3000)
    };
    let mut table = Table { rows: Vec::new() };
    eprintln!("ferry bench: {rounds} round(s) per row");

    if runs("memory") {
        memory_rows(&mut table, if quick { 50 } else { 1000 }).await?;
    }

    if runs("sled") {
        // 1. The raw store.
        let mut raw = Vec::new();
        for _ in 0..rounds {
            raw.push(raw_sled_appends(appends)?);
        }
        let raw = median(raw);
        table.row(
            "1. sled durable appends/s (insert + flush each)",
            format!("{raw:.0}"),
            "sled's limit, a flush (fdatasync) per append".into(),
        );
        let mut single = Vec::new();
        let mut grouped = Vec::new();
        for _ in 0..rounds {
            single.push(raw_fdatasync_appends(appends, 1)?);
            grouped.push(raw_fdatasync_appends(appends * 8, 32)?);
        }
        let (single, disk) = (median(single), median(grouped));
        table.row(
            "1. the disk's durable appends/s (fdatasync per group of 32)",
            format!("{disk:.0}"),
            format!(
                "the physical limit for 32 writers: 400-byte records, one sync per 32 ({single:.0}/s \
                 with one per record)"
            ),
        );
        // The two commit points the embedded store could have, in the same run, alternating.
        let (mut in_log, mut two_files) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            in_log.push(raw_group_commits(appends * 8, 32, CommitPoint::InTheLog)?);
            two_files.push(raw_group_commits(
                appends * 8,
                32,
                CommitPoint::LogThenSled,
            )?);
        }
        let (in_log, two_files) = (median(in_log), median(two_files));
        table.row(
            "1. the disk: log synced, then sled's file (today's commit point)",
            format!("{two_files:.0}"),
            format!(
                "{:.0}% of {in_log:.0}/s with sled's changes in the log's sync (the log as the \
                 only commit point)",
                100.0 * two_files / in_log
            ),
        );

        // 2. End to end.
        let mut rates = Vec::new();
        let mut reused_rates = Vec::new();
        let mut native_rates = Vec::new();
        let reuse = RunnerConfig {
            reuse_instances: true,
            ..RunnerConfig::default()
        };
        let fresh = RunnerConfig::default();
        for _ in 0..rounds {
            let sled = &Backend::Sled;
            rates.push(end_to_end_throughput(sled, commands, fresh, Handler::Wasm).await?);
            reused_rates.push(end_to_end_throughput(sled, commands, reuse, Handler::Wasm).await?);
            native_rates.push(end_to_end_throughput(sled, commands, fresh, Handler::Native).await?);
        }
        let rate = median(rates);
        table.row(
            "2. end-to-end durable commands/s (32 writers)",
            format!("{rate:.0}"),
            format!(
                "{:.0}% of sled's row 1, {:.1}% of the disk's; each command is 2 durable writes",
                rate / raw * 100.0,
                rate / disk * 100.0
            ),
        );
        let reused_rate = median(reused_rates);
        table.row(
            "2. the same with --reuse-instances",
            format!("{reused_rate:.0}"),
            format!("{:.0}% of row 1", reused_rate / raw * 100.0),
        );
        let native_rate = median(native_rates);
        table.row(
            "2. the same with the handler compiled natively (no Wasm)",
            format!("{native_rate:.0}"),
            format!(
                "{:.0}% of row 1; the Wasm rows reach {:.0}% / {:.0}% of it",
                native_rate / raw * 100.0,
                rate / native_rate * 100.0,
                reused_rate / native_rate * 100.0
            ),
        );
        // The machine, just before its latency rows.
        let spin = Duration::from_secs(if quick { 0 } else { 5 }) + Duration::from_millis(200);
        let pauses = core_pauses(spin);
        table.row(
            "0. the machine: longest pause of a core",
            format!("{:.2} ms", pauses.longest.as_secs_f64() * 1e3),
            format!(
                "one window of {:.1} s, a thread spinning on the clock on each core: {} pauses \
                 over 1 ms ({} over 5 ms), {} of them with the thread never switched out by the \
                 guest; a latency below is never shorter than a pause that falls in it",
                spin.as_secs_f64(),
                pauses.over_1_ms,
                pauses.over_5_ms,
                pauses.under_the_guest
            ),
        );
        // Half load is half of the maximum of the same configuration.
        for (label, config, load) in [
            ("full load", fresh, rate),
            ("half load", fresh, rate * 0.5),
            ("half load with --reuse-instances", reuse, reused_rate * 0.5),
        ] {
            let mut latencies = Latencies::default();
            for _ in 0..rounds {
                latencies
                    .add(end_to_end_latency(&Backend::Sled, config, load, commands / 2).await?);
            }
            latencies.row(
                &mut table,
                &format!("2. latency command stored → outcome stored, {label} ({load:.0}/s)"),
                "",
            );
            if label == "half load" {
                let mut floor = Latencies::default();
                for _ in 0..rounds {
                    floor.add(store_latency(load, commands / 2).await?);
                }
                floor.row(
                    &mut table,
                    &format!("1. the store alone at {load:.0}/s: the outcome's append after the command's"),
                    "; the floor under the row above (no consumer, no guest)",
                );
            }
        }
    }
    if runs("jetstream") {
        // 1 and 2 on JetStream.
        match nats::NatsServer::try_start() {
            Err(reason) => table.row(
                "1-2. JetStream rows",
                "skipped".into(),
                format!("no nats-server: {reason}"),
            ),
            Ok(server) => {
                let single = JetStream {
                    servers: server.url(),
                    replicas: 1,
                };
                jetstream::jetstream_rows(
                    &mut table,
                    &single,
                    "JetStream",
                    rounds,
                    appends,
                    commands,
                )
                .await?;
            }
        }
    }
    if runs("cluster") {
        // 1, 2 and the failover gap on a namespace kept by three servers.
        match nats::NatsServer::try_start() {
            Err(reason) => table.row(
                "1-2. JetStream cluster rows",
                "skipped".into(),
                format!("no nats-server: {reason}"),
            ),
            Ok(probe) => {
                drop(probe);
                let mut cluster = cluster::NatsCluster::start(3);
                let replicated = JetStream {
                    servers: cluster.seeds(),
                    replicas: 3,
                };
                let label = "3-replica JetStream cluster";
                jetstream::jetstream_rows(
                    &mut table,
                    &replicated,
                    label,
                    rounds,
                    appends,
                    commands,
                )
                .await?;
                jetstream::failover_row(&mut table, &mut cluster, &replicated, quick).await?;
            }
        }
    }

    if runs("wasm") {
        // 3. The Wasm cost.
        let runtime = Runtime::new(None)?;
        let counter = runtime.load_file(&guest("counter"), Limits::default())?;
        let message = sample_message();
        let calls = if quick { 200 } else { 5000 };
        let per_call = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
            let mut samples = Vec::new();
            for _ in 0..rounds {
                let start = Instant::now();
                for _ in 0..calls {
                    f()?;
                }
                samples.push(start.elapsed().as_secs_f64() * 1e6 / calls as f64);
            }
            Ok(median(samples))
        };
        let fresh = per_call(&mut || {
            let mut instance = counter.instantiate(Box::new(NullHost))?;
            instance.handle_command(&message, Some("{\"total\":1}"))?;
            Ok(())
        })?;
        table.row(
            "3. Wasm per message, fresh instance (instantiate + handle)",
            format!("{fresh:.1} µs"),
            if runtime.pools_instances() {
                "pooled: only the pages the last instance wrote are reset".into()
            } else {
                "on demand: no PAGEMAP_SCAN on this kernel".into()
            },
        );
        let instantiate = per_call(&mut || {
            counter.instantiate(Box::new(NullHost))?;
            Ok(())
        })?;
        table.row(
            "3. of which instantiating and dropping (no call)",
            format!("{instantiate:.1} µs"),
            "the rest is the first call".into(),
        );
        let mut reused_instance = counter.instantiate(Box::new(NullHost))?;
        let reused = per_call(&mut || {
            reused_instance.handle_command(&message, Some("{\"total\":1}"))?;
            Ok(())
        })?;
        table.row(
            "3. Wasm per message, reused instance (handle only)",
            format!("{reused:.1} µs"),
            "--reuse-instances".into(),
        );
        let mut event = sample_message();
        event.message_type = "Incremented".into();
        let project = per_call(&mut || {
            reused_instance.project(Some("{\"total\":1}"), &event)?;
            Ok(())
        })?;
        table.row(
            "3. Wasm per project step",
            format!("{project:.1} µs"),
            String::new(),
        );
    }
    if runs("start") {
        // 4. Cold start.
        let bytes = std::fs::read(guest("counter"))?;
        let mut from_source = Vec::new();
        let mut from_cache = Vec::new();
        let cache = tempfile::tempdir()?;
        Runtime::new(Some(cache.path().to_path_buf()))?.load(&bytes, Limits::default())?;
        for _ in 0..rounds {
            let runtime = Runtime::new(None)?;
            let start = Instant::now();
            runtime.load(&bytes, Limits::default())?;
            from_source.push(start.elapsed().as_secs_f64() * 1e3);
            let runtime = Runtime::new(Some(cache.path().to_path_buf()))?;
            let start = Instant::now();
            runtime.load(&bytes, Limits::default())?;
            from_cache.push(start.elapsed().as_secs_f64() * 1e3);
        }
        table.row(
            "4. load a service from source (compile)",
            format!("{:.1} ms", median(from_source)),
            format!("counter, {} KB", bytes.len() / 1000),
        );
        table.row(
            "4. load a service from the precompiled cache",
            format!("{:.2} ms", median(from_cache)),
            String::new(),
        );
        let mut host_start = Vec::new();
        let mut host_cold = Vec::new();
        for _ in 0..rounds {
            let dir = tempfile::tempdir()?;
            for pass in 0..2 {
                let start = Instant::now();
                let store: Arc<dyn MessageStore> =
                    Arc::new(SledStore::open(dir.path().join("store"))?);
                let runtime = Runtime::new(Some(dir.path().join("cache")))?;
                let services = article_services(&runtime)?;
                let running = Running::start(
                    store,
                    &services,
                    RunnerConfig::default(),
                    &Capabilities::default(),
                )?;
                let elapsed = start.elapsed().as_secs_f64() * 1e3;
                running.shutdown().await;
                if pass == 0 {
                    host_cold.push(elapsed);
                } else {
                    host_start.push(elapsed);
                }
            }
        }
        table.row(
            "4. host start with the article's 4 services, empty cache",
            format!("{:.1} ms", median(host_cold)),
            "compiles each component".into(),
        );
        table.row(
            "4. host start with the article's 4 services, from the cache",
            format!("{:.1} ms", median(host_start)),
            "store open + load + consumers".into(),
        );
    }
    if runs("instances") {
        // 6. One service as several processes on JetStream.
        match nats::NatsServer::try_start() {
            Err(reason) => table.row(
                "6. instance rows",
                "skipped".into(),
                format!("no nats-server: {reason}"),
            ),
            Ok(server) => instances::rows(&mut table, &server.url(), quick, guest).await?,
        }
    }
    println!();
    println!(
        "ferry bench ({}), {} core(s)",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    table.print();
    Ok(())
}
