//! Rows 6: one service as several `ferry run` processes on one JetStream namespace. The user
//! service's registration hashes a password (PBKDF2, 20 000 rounds), so it is CPU-bound: the rows
//! give its throughput with 1, 2 and 3 instances, and the time from `SIGKILL` of one instance to
//! its partitions being owned again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ferry::store::{
    Category, Commit, ConsumerInfo, MessageStore, NatsStore, NewMessage, StreamName,
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

/// A `ferry run --only user` process, killed when dropped.
struct Instance {
    child: Child,
}

impl Instance {
    fn start(binary: &Path, data: &Path, services: &Path, store: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data)?;
        let child = Command::new(binary)
            .arg("--data")
            .arg(data)
            .arg("--services")
            .arg(services)
            .args(["--store", store, "run", "--only", "user"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("ferry run")?;
        Ok(Self { child })
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

async fn commands_consumer(store: &NatsStore) -> anyhow::Result<Option<ConsumerInfo>> {
    let category = Category::parse("user:command")?;
    Ok(store
        .consumers(Some(&category))
        .await?
        .into_iter()
        .find(|c| c.consumer.name == "microservice:user"))
}

/// Waits until every partition is owned by one of `live` (and each of them owns some).
async fn wait_owned(store: &NatsStore, live: &[&Instance]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if let Some(info) = commands_consumer(store).await? {
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

fn registration(n: usize) -> anyhow::Result<Commit> {
    Ok(Commit::append(
        StreamName::parse(&format!("user:command.u{n}"))?,
        None,
        vec![NewMessage {
            id: format!("register-{n}"),
            message_type: "RegisterUser".into(),
            data: serde_json::json!({
                "username": format!("user{n}"), "email": format!("user{n}@example.com"),
                "password": "correct horse battery staple", "firstName": "Ann", "lastName": "Lee",
            }),
            metadata: Default::default(),
            not_before_ms: None,
        }],
    ))
}

/// Registrations handled per second by `count` instances, from the first write to no lag; and
/// with two or more, how long a killed instance's partitions took to be owned again.
async fn run(
    url: &str,
    work: &Path,
    count: usize,
    registrations: usize,
) -> anyhow::Result<(f64, Option<Duration>)> {
    let binary = ferry_binary()?;
    let services = work.join("services");
    let store_url = format!("{url}/instances{count}");
    let store = NatsStore::connect(&store_url).await?;
    let instances = (0..count)
        .map(|i| {
            Instance::start(
                &binary,
                &work.join(format!("data-{count}-{i}")),
                &services,
                &store_url,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    wait_owned(&store, &instances.iter().collect::<Vec<_>>()).await?;

    let start = Instant::now();
    for n in 0..registrations {
        store.commit(registration(n)?).await?;
    }
    loop {
        if commands_consumer(&store).await?.is_some_and(|c| c.lag == 0) {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "registrations not handled in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = registrations as f64 / start.elapsed().as_secs_f64();

    let mut instances = instances;
    let takeover = match instances.len() {
        0 | 1 => None,
        _ => {
            let mut victim = instances.remove(0);
            victim.child.kill()?;
            victim.child.wait()?;
            Some(wait_owned(&store, &instances.iter().collect::<Vec<_>>()).await?)
        }
    };
    Ok((rate, takeover))
}

pub async fn rows(table: &mut Table, url: &str, quick: bool, user: &Path) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    std::fs::create_dir_all(work.path().join("services"))?;
    std::fs::copy(user, work.path().join("services/user.wasm"))?;
    let registrations = if quick { 20 } else { 400 };
    let mut rates = Vec::new();
    let mut takeovers = Vec::new();
    for count in 1..=3 {
        let (rate, takeover) = run(url, work.path(), count, registrations).await?;
        rates.push(rate);
        takeovers.extend(takeover);
    }
    for (count, rate) in (1..).zip(&rates) {
        table.row(
            &format!("6. user registrations/s on JetStream, {count} instance(s) (processes)"),
            format!("{rate:.0}"),
            format!(
                "{:.2}x one instance; PBKDF2 per registration, CPU-bound",
                rate / rates[0]
            ),
        );
    }
    let slowest = takeovers.iter().max().copied().unwrap_or_default();
    table.row(
        "6. SIGKILL of an instance → its partitions owned again",
        format!("{:.2} s", slowest.as_secs_f64()),
        "slowest of the 2- and 3-instance runs; lease 5 s (default)".into(),
    );
    Ok(())
}
