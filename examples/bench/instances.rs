//! Rows 6: one service as several `ferry run` processes on one JetStream namespace, with 1, 2
//! and 3 instances: the user service's registration, which hashes a password (PBKDF2, 20 000
//! rounds) and so is CPU-bound; the counter's increments, which cost next to nothing in the guest,
//! so the namespace's one stream is the limit; and the time from `SIGKILL` of one instance to its
//! partitions being owned again.
//!
//! Each instance decides on one thread (`--decide-lanes 1`), one core's worth: with a lane per
//! core, one instance already uses both cores of a 2-core machine, and a second could only add
//! what a second machine would. A last row shows one instance with its default lanes. Each
//! figure is the median of 3 rounds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ferry::store::{
    Category, Commit, ConsumerInfo, MessageStore, NatsStore, NewMessage, StreamAppend, StreamName,
};

use super::Table;

/// The `ferry` binary beside this example (`target/<profile>/ferry`).
fn ferry_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("ferry"))
        .context("no folder above the example")?;
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: cargo build --bin ferry",
        binary.display()
    );
    Ok(binary)
}

/// A `ferry run --only SERVICE` process, killed when dropped.
struct Instance {
    child: Child,
}

impl Instance {
    fn start(
        binary: &Path,
        data: &Path,
        services: &Path,
        store: &str,
        service: &str,
        lanes: Option<usize>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data)?;
        let child = Command::new(binary)
            .arg("--data")
            .arg(data)
            .arg("--services")
            .arg(services)
            .args(["--store", store, "run", "--only", service])
            .args(lanes.map(|lanes| format!("--decide-lanes={lanes}")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("ferry run")?;
        Ok(Self { child })
    }

    /// SIGTERM: a graceful stop, which finishes the page in flight and hands the partitions
    /// over.
    fn stop(&mut self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        self.child.wait()?;
        Ok(())
    }

    /// The instance name carries the process id.
    fn is(&self, instance: &str) -> bool {
        instance.contains(&format!("-{}-", self.child.id()))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time in clock ticks, from `/proc` (Linux): the machine's busy time (every core), and
/// the given processes' own. `None` where there is no `/proc`. Time the hypervisor stole is not
/// busy: on a shared host it is what makes one run slower than the next.
fn cpu_ticks(pids: &[u32]) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq: busy is all but idle and iowait.
    let busy = fields.iter().take(7).sum::<u64>() - fields.get(3)? - fields.get(4)?;
    let mut own = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the command name in parentheses: state is field 3, utime and stime 14 and 15.
        let after_name = stat.rsplit_once(')')?.1;
        let fields: Vec<u64> = after_name
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|f| f.parse().ok())
            .collect();
        own += fields.iter().sum::<u64>();
    }
    Some((busy, own))
}

/// Waits until every stream in `done` reaches its version.
///
/// Watched by stream versions, a direct get at a time, stopping at the first stream not yet
/// done: the watcher must not take CPU from the instances measured. (Asking for every waiting
/// stream each round, 400 gets every 50 ms, kept nats-server busy on the cores the instances
/// share; listing the consumers counts the lag of every partition.)
async fn wait_done(
    store: &NatsStore,
    done: impl IntoIterator<Item = (StreamName, u64)>,
    start: Instant,
) -> anyhow::Result<()> {
    let mut waiting = done.into_iter().peekable();
    while let Some((stream, version)) = waiting.peek() {
        if store.stream_version(stream).await? >= *version {
            waiting.next();
            continue;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "commands not handled in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Two instances handling a flow; once a quarter of it is done, one stops gracefully (SIGTERM)
/// while it has pages in hand: how long until the other owns every partition. The stopping
/// instance lets its commit in flight land and drops the page it is deciding (the other
/// handles it), so a page's length is not in this figure.
async fn graceful_handover(url: &str, work: &Path, flow: Flow) -> anyhow::Result<Duration> {
    let binary = ferry_binary()?;
    let run_name = format!("{}-graceful", flow.service);
    let store_url = format!("{url}/{run_name}");
    let store = NatsStore::connect(&store_url).await?;
    let mut instances = (0..2)
        .map(|i| {
            Instance::start(
                &binary,
                &work.join(format!("data-{run_name}-{i}")),
                &work.join("services"),
                &store_url,
                flow.service,
                Some(1),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    wait_owned(&store, flow.service, &instances.iter().collect::<Vec<_>>()).await?;
    let start = Instant::now();
    for commit in flow.commits {
        store.commit(commit).await?;
    }
    let quarter = flow.done.len() / 4;
    let mut done = flow.done.into_iter();
    wait_done(&store, done.by_ref().take(quarter), start).await?;
    let mut leaving = instances.remove(0);
    let stopping = Instant::now();
    leaving.stop()?;
    let live: Vec<&Instance> = instances.iter().collect();
    wait_owned(&store, flow.service, &live).await?;
    let handover = stopping.elapsed();
    // Nothing is lost: the rest is handled by the one left.
    wait_done(&store, done, start).await?;
    Ok(handover)
}

/// What one run measured.
struct Measured {
    rate: f64,
    /// With two or more instances: how long a killed one's partitions took to be owned again.
    takeover: Option<Duration>,
    /// While the commands were handled: the share of the machine's CPU in use, and the share
    /// of that the instances used (the rest: nats-server, this program, the system).
    busy: Option<(f64, f64)>,
}

/// A service and the commands of one run.
struct Flow {
    service: &'static str,
    commits: Vec<Commit>,
    commands: usize,
    /// The entity streams and the version each reaches once every command is handled.
    done: Vec<(StreamName, u64)>,
}

async fn commands_consumer(
    store: &NatsStore,
    service: &str,
) -> anyhow::Result<Option<ConsumerInfo>> {
    let category = Category::parse(&format!("{service}:command"))?;
    let name = format!("microservice:{service}");
    Ok(store
        .consumers(Some(&category))
        .await?
        .into_iter()
        .find(|c| c.consumer.name == name))
}

/// Waits until every partition is owned by one of `live` (and each of them owns some).
async fn wait_owned(
    store: &NatsStore,
    service: &str,
    live: &[&Instance],
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if let Some(info) = commands_consumer(store, service).await? {
            let owned_by_live = info.partitions.iter().all(|p| {
                p.owner
                    .as_deref()
                    .is_some_and(|owner| live.iter().any(|i| i.is(owner)))
            });
            let everyone_holds = live.iter().all(|i| {
                info.partitions
                    .iter()
                    .any(|p| p.owner.as_deref().is_some_and(|o| i.is(o)))
            });
            if owned_by_live && everyone_holds {
                return Ok(start.elapsed());
            }
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(120),
            "the instances never shared the partitions"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn new_command(id: String, message_type: &str, data: serde_json::Value) -> NewMessage {
    NewMessage {
        id,
        message_type: message_type.into(),
        data,
        metadata: Default::default(),
        not_before_ms: None,
    }
}

/// `count` commands, 50 to a commit: `command(n)` is the `n`th command's stream and message.
fn commands_in_commits(
    count: usize,
    command: impl Fn(usize) -> anyhow::Result<(StreamName, NewMessage)>,
) -> anyhow::Result<Vec<Commit>> {
    (0..count.div_ceil(50))
        .map(|chunk| {
            let appends = (chunk * 50..((chunk + 1) * 50).min(count))
                .map(|n| {
                    let (stream, message) = command(n)?;
                    Ok(StreamAppend {
                        stream,
                        expected_version: None,
                        messages: vec![message],
                    })
                })
                .collect::<anyhow::Result<_>>()?;
            Ok(Commit {
                appends,
                ..Commit::default()
            })
        })
        .collect()
}

/// Registrations of as many users, 50 to a commit: written one at a time, the commits took
/// nats-server ~40% of a core for the first two seconds of a run, CPU the instances measured
/// would otherwise have had (with one instance the other core was idle, so it cost nothing there).
fn registrations(count: usize) -> anyhow::Result<Flow> {
    let commits = commands_in_commits(count, |n| {
        let data = serde_json::json!({
            "username": format!("user{n}"), "email": format!("user{n}@example.com"),
            "password": "correct horse battery staple", "firstName": "Ann", "lastName": "Lee",
        });
        Ok((
            StreamName::parse(&format!("user:command.u{n}"))?,
            new_command(format!("register-{n}"), "RegisterUser", data),
        ))
    })?;
    let done = (0..count)
        .map(|n| Ok((StreamName::parse(&format!("user.u{n}"))?, 1)))
        .collect::<anyhow::Result<_>>()?;
    Ok(Flow {
        service: "user",
        commits,
        commands: count,
        done,
    })
}

/// Increments over 64 counters, 50 to a commit.
fn increments(count: usize) -> anyhow::Result<Flow> {
    let commits = commands_in_commits(count, |n| {
        Ok((
            StreamName::parse(&format!("counter:command.c{}", n % 64))?,
            new_command(
                format!("inc-{n}"),
                "Increment",
                serde_json::json!({"by": 1}),
            ),
        ))
    })?;
    let done = (0..64.min(count))
        .map(|c| {
            let increments = (0..count).filter(|n| n % 64 == c).count() as u64;
            Ok((StreamName::parse(&format!("counter.c{c}"))?, increments))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Flow {
        service: "counter",
        commits,
        commands: count,
        done,
    })
}

/// Commands handled per second by `count` instances (deciding on `lanes` threads each, or their
/// default), from the first write to no lag, and where the CPU went meanwhile; with two or more,
/// how long a killed instance's partitions took to be owned again.
async fn run(
    url: &str,
    work: &Path,
    (count, lanes, round): (usize, Option<usize>, usize),
    flow: Flow,
) -> anyhow::Result<Measured> {
    let binary = ferry_binary()?;
    let services = work.join("services");
    let lanes_name = lanes.map_or("default".into(), |lanes| lanes.to_string());
    let run_name = format!("{}{count}-{lanes_name}-{round}", flow.service);
    let store_url = format!("{url}/{run_name}");
    let store = NatsStore::connect(&store_url).await?;
    let instances = (0..count)
        .map(|i| {
            Instance::start(
                &binary,
                &work.join(format!("data-{run_name}-{i}")),
                &services,
                &store_url,
                flow.service,
                lanes,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    wait_owned(&store, flow.service, &instances.iter().collect::<Vec<_>>()).await?;

    let pids: Vec<u32> = instances.iter().map(|i| i.child.id()).collect();
    let cpu_before = cpu_ticks(&pids);
    let start = Instant::now();
    for commit in flow.commits {
        store.commit(commit).await?;
    }
    wait_done(&store, flow.done, start).await?;
    let elapsed = start.elapsed().as_secs_f64();
    let rate = flow.commands as f64 / elapsed;
    let busy = cpu_before.zip(cpu_ticks(&pids)).map(|(before, after)| {
        let busy = after.0.saturating_sub(before.0) as f64;
        let own = after.1.saturating_sub(before.1) as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        // Clock ticks are 100 a second on Linux.
        (busy / (elapsed * 100.0 * cores), own / busy.max(1.0))
    });

    let mut instances = instances;
    let takeover = match instances.len() {
        0 | 1 => None,
        _ => {
            let mut victim = instances.remove(0);
            victim.child.kill()?;
            victim.child.wait()?;
            let live: Vec<&Instance> = instances.iter().collect();
            Some(wait_owned(&store, flow.service, &live).await?)
        }
    };
    Ok(Measured {
        rate,
        takeover,
        busy,
    })
}

pub async fn rows(
    table: &mut Table,
    url: &str,
    quick: bool,
    guest: impl Fn(&str) -> PathBuf,
) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    std::fs::create_dir_all(work.path().join("services"))?;
    for (file, name) in [("user", "user"), ("counter_commands", "counter")] {
        std::fs::copy(
            guest(file),
            work.path().join(format!("services/{name}.wasm")),
        )?;
    }
    // Rounds alternate the instance counts, so that the machine's drift falls on each alike.
    let (users, increments_count, rounds) = if quick { (20, 200, 1) } else { (400, 6000, 3) };
    let mut takeovers = Vec::new();
    for (what, flow) in [
        ("user registrations/s (CPU-bound: PBKDF2)", 0),
        ("counter increments/s (the stream is the limit)", 1),
    ] {
        let new_flow = || match flow {
            0 => registrations(users),
            _ => increments(increments_count),
        };
        // Per round: 1, 2 and 3 instances on one lane each, then 1 on a lane per core.
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); 4];
        let mut busy: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 4];
        for round in 0..rounds {
            for (rates_index, count, lanes) in [
                (0, 1, Some(1)),
                (1, 2, Some(1)),
                (2, 3, Some(1)),
                (3, 1, None),
            ] {
                let measured = run(url, work.path(), (count, lanes, round), new_flow()?).await?;
                rates[rates_index].push(measured.rate);
                busy[rates_index].extend(measured.busy);
                takeovers.extend(measured.takeover);
            }
        }
        let per_round = |i: usize| {
            (0..rounds)
                .map(|r| format!("{:.2}x", rates[i][r] / rates[0][r]))
                .collect::<Vec<_>>()
                .join(", ")
        };
        // Where the CPU went: the median round's machine use and the instances' part of it.
        let cpu = |i: usize| {
            let machine = super::median(busy[i].iter().map(|b| b.0).collect());
            let instances = super::median(busy[i].iter().map(|b| b.1).collect());
            match busy[i].is_empty() {
                true => String::new(),
                false => format!(
                    "; CPU {:.0}% busy, {:.0}% of it the instances'",
                    machine * 100.0,
                    instances * 100.0
                ),
            }
        };
        let one = super::median(rates[0].clone());
        for (i, count) in [(0, 1), (1, 2), (2, 3)] {
            let rate = super::median(rates[i].clone());
            table.row(
                &format!("6. {what} on JetStream, {count} instance(s) (processes, 1 lane each)"),
                format!("{rate:.0}"),
                format!(
                    "{:.2}x one instance (rounds: {}){}",
                    rate / one,
                    per_round(i),
                    cpu(i)
                ),
            );
        }
        let rate = super::median(rates[3].clone());
        table.row(
            &format!("6. {what} on JetStream, 1 instance, a lane per core"),
            format!("{rate:.0}"),
            format!(
                "{:.2}x one instance on 1 lane (rounds: {}){}",
                rate / one,
                per_round(3),
                cpu(3)
            ),
        );
    }
    let handover = graceful_handover(url, work.path(), registrations(users)?).await?;
    table.row(
        "6. graceful stop of one of 2 instances mid-flow (registrations) → the other owns every partition",
        format!("{:.2} s", handover.as_secs_f64()),
        "SIGTERM to owned by the other; the commit in flight lands, the page being decided is dropped".into(),
    );
    let slowest = takeovers.iter().max().copied().unwrap_or_default();
    table.row(
        "6. SIGKILL of an instance → its partitions owned again",
        format!("{:.2} s", slowest.as_secs_f64()),
        "slowest of the 2- and 3-instance runs; lease 5 s (default)".into(),
    );
    Ok(())
}
