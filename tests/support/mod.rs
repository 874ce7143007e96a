//! Shared test set-up: the real guest components, a real `ferry` process on a real data folder,
//! and the CLI.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod billing;
pub mod cluster;
pub mod delay;
pub mod http;
pub mod lazyfs;
pub mod leases;
pub mod nats;
pub mod smtp;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// Builds the guest workspace once per test binary and returns the path of a component.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--quiet", "--target", "wasm32-wasip2"])
            .current_dir(repo_root().join("guests"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "the guests build");
    });
    let path = repo_root()
        .join("guests/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    assert!(path.exists(), "{} was built", path.display());
    path
}

/// The `counter-commands` guest running in this process (default settings) on a new sled store
/// in `dir`: the store, the running host, and the consumer of the counter's commands.
pub fn start_counter_commands(
    dir: &Path,
) -> (
    Arc<dyn ferry::store::MessageStore>,
    ferry::service::Running,
    ferry::store::ConsumerId,
) {
    use ferry::service::{Capabilities, LoadedService, RunnerConfig, Running};
    use ferry::store::{Category, ConsumerId, SledStore};
    use ferry::wasm::{Limits, Runtime};

    let store: Arc<dyn ferry::store::MessageStore> =
        Arc::new(SledStore::open(dir.join("store")).expect("store"));
    let runtime = Runtime::new(None).expect("runtime");
    let path = guest("counter_commands");
    let component = runtime.load_file(&path, Limits::default()).expect("load");
    let running = Running::start(
        store.clone(),
        &[LoadedService { path, component }],
        RunnerConfig::default(),
        &Capabilities::default(),
    )
    .expect("start");
    let consumer = ConsumerId::new(
        Category::parse("counter:command").expect("category"),
        "microservice:counter",
    );
    (store, running, consumer)
}

/// A component written in another language (`email_js`, `user_aggregator_py`), built once per
/// test binary by `scripts/build-polyglot` (componentize-js from npm, componentize-py from PyPI).
pub fn polyglot(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new("bash")
            .arg(repo_root().join("scripts/build-polyglot"))
            .current_dir(repo_root())
            .status()
            .expect("bash runs");
        assert!(
            status.success(),
            "scripts/build-polyglot builds the components"
        );
    });
    let path = repo_root()
        .join("guests/target/polyglot")
        .join(format!("{name}.wasm"));
    assert!(path.exists(), "{} was built", path.display());
    path
}

/// Components to install in place of Rust guests, from `FERRY_GUEST_SWAP`
/// (`email=email_js,user_aggregator=user_aggregator_py`): the same tests then run with services
/// written in other languages. A pair naming no Rust guest fails loudly, so that a typo cannot
/// quietly run the Rust guests instead.
fn swaps() -> &'static [(String, String)] {
    static SWAPS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    SWAPS.get_or_init(|| {
        let text = std::env::var("FERRY_GUEST_SWAP").unwrap_or_default();
        text.split(',')
            .filter(|pair| !pair.trim().is_empty())
            .map(|pair| {
                let (rust, other) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("FERRY_GUEST_SWAP: {pair:?} is not RUST=OTHER"));
                assert!(
                    repo_root()
                        .join("guests")
                        .join(rust.replace('_', "-"))
                        .is_dir(),
                    "FERRY_GUEST_SWAP: {rust:?} is not a Rust guest in guests/"
                );
                (rust.to_owned(), other.to_owned())
            })
            .collect()
    })
}

fn swapped(name: &str) -> Option<PathBuf> {
    swaps()
        .iter()
        .find(|(rust, _)| rust == name)
        .map(|(_, other)| polyglot(other))
}

/// Precompiled code of the swapped-in components, compiled once and copied into each data
/// folder, so that every test does not compile them again (seconds each).
fn seed_cache(data: &Path) {
    static SEEDED: OnceLock<PathBuf> = OnceLock::new();
    if swaps().is_empty() {
        return;
    }
    let shared = SEEDED.get_or_init(|| {
        let shared = repo_root().join("target/polyglot-cache");
        for (_, other) in swaps() {
            let status = Command::new(env!("CARGO_BIN_EXE_ferry"))
                .arg("--data")
                .arg(&shared)
                .arg("inspect")
                .arg(polyglot(other))
                .stdout(Stdio::null())
                .status()
                .expect("ferry inspect runs");
            assert!(status.success(), "{other} loads");
        }
        shared.join("cache")
    });
    let cache = data.join("cache");
    std::fs::create_dir_all(&cache).expect("cache folder");
    for entry in std::fs::read_dir(shared).expect("shared cache").flatten() {
        let _ = std::fs::copy(entry.path(), cache.join(entry.file_name()));
    }
}

/// A data folder and a services folder holding the named guests; the store is the data
/// folder's sled store unless [`Setup::with_store`] names a JetStream.
pub struct Setup {
    pub dir: tempfile::TempDir,
    store: Option<String>,
}

impl Setup {
    pub fn new(guests: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("services")).expect("services folder");
        let setup = Self { dir, store: None };
        for name in guests {
            setup.install(name);
        }
        setup
    }

    /// The same, on a JetStream (`nats://...`): every process and CLI call of the set-up uses it.
    pub fn with_store(guests: &[&str], store: &str) -> Self {
        let mut setup = Self::new(guests);
        setup.store = Some(store.to_owned());
        setup
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn services(&self) -> PathBuf {
        self.dir.path().join("services")
    }

    pub fn install(&self, name: &str) {
        let source = swapped(name).unwrap_or_else(|| guest(name));
        std::fs::copy(source, self.services().join(format!("{name}.wasm")))
            .expect("copy component");
    }

    /// Puts a component file into the services folder under a file name of its own.
    pub fn install_file(&self, component: &Path, file_name: &str) {
        std::fs::copy(component, self.services().join(file_name)).expect("copy component");
    }

    pub fn uninstall(&self, name: &str) {
        std::fs::remove_file(self.services().join(format!("{name}.wasm")))
            .expect("remove component");
    }

    /// Moves a consumer's position, as a lost acknowledgement would (the host must be stopped).
    pub fn rewind_consumer(&self, category: &str, name: &str, position: u64) {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            use ferry::store::{
                Category, Commit, ConsumerId, GroupSpec, MessageStore, PartitionKey, Settle,
                SledStore,
            };
            let store = SledStore::open(self.data().join("store")).expect("open");
            let consumer = ConsumerId::new(
                Category::parse(category).expect("category"),
                name.to_owned(),
            );
            let group = store
                .join_group(&consumer, GroupSpec::new(PartitionKey::Entity))
                .await
                .expect("group");
            store
                .commit(Commit {
                    settle: Some(Settle::Advance {
                        consumer,
                        partitions: group.every_partition(),
                        to: position,
                    }),
                    ..Commit::default()
                })
                .await
                .expect("rewind");
        });
    }

    /// The emails delivered into the maildir: file name → text.
    pub fn emails(&self) -> Vec<(String, String)> {
        self.emails_in(&self.data())
    }

    /// The emails delivered into the maildir of another data folder.
    pub fn emails_in(&self, data: &Path) -> Vec<(String, String)> {
        let mut emails: Vec<(String, String)> = std::fs::read_dir(data.join("maildir/new"))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| {
                        (
                            e.file_name().to_string_lossy().into_owned(),
                            std::fs::read_to_string(e.path()).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        emails.sort();
        emails
    }

    /// Waits until a stream holds at least `count` messages and returns them.
    pub fn wait_for_stream(&self, stream: &str, count: usize) -> Vec<Value> {
        let mut messages = Vec::new();
        wait_until(
            Duration::from_secs(60),
            &format!("{stream} holds {count} messages"),
            || {
                messages = self.read(stream);
                messages.len() >= count
            },
        );
        messages
    }

    fn command(&self) -> Command {
        self.command_in(&self.data())
    }

    pub fn command_in(&self, data: &Path) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
        command
            .arg("--data")
            .arg(data)
            .arg("--services")
            .arg(self.services())
            .env("RUST_LOG", "info,ferry=debug");
        if let Some(store) = &self.store {
            command.arg("--store").arg(store);
        }
        command
    }

    /// Runs a CLI command to the end.
    pub fn ferry(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("ferry runs")
    }

    /// Runs a CLI command that must succeed and returns its `--json` answer.
    pub fn ferry_json(&self, args: &[&str]) -> Value {
        let output = self
            .command()
            .arg("--json")
            .args(args)
            .output()
            .expect("ferry runs");
        assert!(
            output.status.success(),
            "ferry {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("JSON answer")
    }

    /// `ferry send`: appends one message; returns what was written.
    pub fn send(&self, stream: &str, message_type: &str, data: Value) -> Value {
        self.ferry_json(&["send", stream, message_type, &data.to_string()])["written"].clone()
    }

    /// Starts `ferry run` and waits until it listens.
    pub fn start(&self, extra: &[&str]) -> Host {
        self.start_in(&self.data(), extra)
    }

    /// Starts `ferry run` on its own data folder (one process of several sharing a JetStream).
    pub fn start_in(&self, data: &Path, extra: &[&str]) -> Host {
        self.try_start_in(data, extra)
            .unwrap_or_else(|why| panic!("the host did not start: {why}"))
    }

    /// The same, or why not: the process ended before it listened (with its log's tail).
    pub fn try_start_in(&self, data: &Path, extra: &[&str]) -> Result<Host, String> {
        self.try_start_with_env(data, extra, &[])
    }

    /// `start_in` with these environment variables (a clock set off by libfaketime).
    pub fn start_with_env(&self, data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Host {
        self.try_start_with_env(data, extra, env)
            .unwrap_or_else(|why| panic!("the host did not start: {why}"))
    }

    fn try_start_with_env(
        &self,
        data: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Host, String> {
        seed_cache(data);
        let log = data.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = self
            .command_in(data)
            .arg("run")
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("ferry run starts");
        let mut host = Host { child, log };
        let socket = data.join("ferry.sock");
        // Long enough for a first compile of the large JavaScript and Python components.
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Ok(Some(status)) = host.child.try_wait() {
                return Err(format!("it exited ({status}): {}", host.log_tail(20)));
            }
            if started.elapsed() > Duration::from_secs(300) {
                return Err(format!("it did not listen in 300 s: {}", host.log_tail(20)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(host)
    }

    pub fn read(&self, target: &str) -> Vec<Value> {
        self.ferry_json(&["read", target])["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until the users views hold the registration of `u1` as `ann` (the article's
    /// registration flow), each written at `registered`'s global position.
    pub fn wait_for_registered_ann(&self, wait: Duration, registered: &Value) {
        wait_until(wait, "the users view has the user", || {
            self.view_row("users", "u1")
                .is_some_and(|row| row["value"]["username"] == "ann")
        });
        let by_name = self.view_row("users-by-username", "ann").expect("row");
        assert_eq!(by_name["value"]["userId"], "u1");
        assert_eq!(by_name["lastUpdateSeq"], registered["globalPosition"]);
        assert!(self.view_row("users-by-email", "ann@example.com").is_some());
    }

    /// One view row with its `lastUpdateSeq`, or `None` when it is not there (yet).
    pub fn view_row(&self, table: &str, key: &str) -> Option<Value> {
        let output = self.ferry(&["--json", "view", table, key]);
        if !output.status.success() {
            return None;
        }
        let answer: Value = serde_json::from_slice(&output.stdout).ok()?;
        Some(answer["rows"][0]["row"].clone())
    }

    pub fn parked(&self) -> Vec<Value> {
        self.ferry_json(&["parked"])["parked"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// A running `ferry run` process; killed when dropped.
pub struct Host {
    child: Child,
    pub log: PathBuf,
}

impl Host {
    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean stop.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let _ = self.child.wait();
    }

    /// Sends a signal (`STOP`, `CONT`, `TERM`) without waiting.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the host's log, headed by its file name.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        format!("--- {} (last {lines} lines)\n{tail}", self.log.display())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// xorshift64*: small, seeded, good enough to pick the moments of faults.
pub struct Rng(pub u64);

impl Rng {
    /// Seeded from `FERRY_<NAME>_SEED` when set (to replay a run), else from the clock.
    pub fn seeded(name: &str) -> Self {
        let seed = std::env::var(format!("FERRY_{name}_SEED"))
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    | 1
            });
        Self(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low)
    }
}

/// A steady flow of commands, one after another, each sent again with the same id until it is
/// stored (a refused send, as during an election, is retried as a user would).
pub struct SteadySender {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    thread: JoinHandle<()>,
}

/// One command to send: stream, type, data (JSON) and id.
pub struct Sent {
    pub stream: String,
    pub message_type: &'static str,
    pub data: String,
    pub id: String,
}

impl SteadySender {
    /// `Increment` commands to the counter: command `cmd-N` goes to
    /// `counter:command.e{N % entities}`.
    pub fn start(setup: Arc<Setup>, entities: usize) -> Self {
        Self::sending(setup, Duration::ZERO, move |n| Sent {
            stream: format!("counter:command.e{}", n % entities),
            message_type: "Increment",
            data: r#"{"by":1}"#.to_owned(),
            id: format!("cmd-{n}"),
        })
    }

    /// Command `command(N)` for N = 0, 1, ... (N the count stored so far), with `pause` after
    /// each try.
    pub fn sending(
        setup: Arc<Setup>,
        pause: Duration,
        command: impl Fn(usize) -> Sent + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Sent {
                        stream,
                        message_type,
                        data,
                        id,
                    } = command(sent.load(Ordering::Relaxed));
                    let output = setup.ferry(&["send", &stream, message_type, &data, "--id", &id]);
                    if output.status.success() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(pause);
                }
            })
        };
        Self { stop, sent, thread }
    }

    /// How many commands were stored so far.
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops the flow; how many commands were stored.
    pub fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sender");
        self.sent.load(Ordering::Relaxed)
    }
}

/// Every command `SteadySender` sent was handled exactly once, in order per entity: one
/// `Incremented` per command in each `counter.eN`, totals counting up by one, no command the
/// cause of two events. `run` names the run in failure messages (a seed to replay it).
pub fn assert_counted_once_in_order(setup: &Setup, commands: usize, entities: usize, run: &str) {
    let mut causes = std::collections::HashSet::new();
    let mut event_ids = std::collections::HashSet::new();
    for entity in 0..entities {
        let expected = (0..commands).filter(|n| n % entities == entity).count();
        let events = setup.wait_for_stream(&format!("counter.e{entity}"), expected);
        assert_eq!(
            events.len(),
            expected,
            "e{entity}: one event per command ({run})"
        );
        for (n, event) in events.iter().enumerate() {
            assert_eq!(
                event["data"]["total"],
                (n + 1) as u64,
                "e{entity} counts in order ({run})"
            );
            assert!(event_ids.insert(event["id"].as_str().unwrap_or_default().to_owned()));
            let cause = event["metadata"]["causationId"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            assert!(causes.insert(cause), "a command was handled twice ({run})");
        }
    }
    assert_eq!(causes.len(), commands);
}

/// The `type` of each message, in order.
pub fn types(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["type"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Polls until `done` holds; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, done: impl FnMut() -> bool) {
    wait_until_or_explain(timeout, what, done, String::new);
}

/// As `wait_until`, and on a timeout the panic also carries `explain()`: the state that shows
/// why (log tails, counts), since a flaky wait is only fixable with it.
pub fn wait_until_or_explain(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
    explain: impl FnOnce() -> String,
) {
    let start = Instant::now();
    while !done() {
        if start.elapsed() >= timeout {
            panic!("timed out waiting until {what}\n{}", explain());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes a file only its owner may read (0600), as Ferry asks of secret files.
pub fn write_private(path: &Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, contents).expect("write a private file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}
