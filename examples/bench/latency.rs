//! Latency rounds (commands paced at a rate, p50 and p99 of each) and the machine's own pauses
//! (row 0).

use super::*;

/// p50 and p99 of one round's samples, in milliseconds.
#[derive(Clone, Copy)]
pub(super) struct Spread {
    pub(super) p50: f64,
    pub(super) p99: f64,
}

impl Spread {
    pub(super) fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let ms = |p| percentile(&samples, p).as_secs_f64() * 1e3;
        Self {
            p50: ms(0.5),
            p99: ms(0.99),
        }
    }

    /// The median of each percentile over the rounds.
    pub(super) fn median(rounds: &[Spread]) -> Self {
        Self {
            p50: median(rounds.iter().map(|s| s.p50).collect()),
            p99: median(rounds.iter().map(|s| s.p99).collect()),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p50 {:.2} ms, p99 {:.2} ms", self.p50, self.p99)
    }
}

/// A latency row over rounds: from the command stored to its outcome stored, and from the send
/// (the command's own append included).
#[derive(Default)]
pub(super) struct Latencies {
    pub(super) from_append: Vec<Spread>,
    pub(super) from_send: Vec<Spread>,
}

impl Latencies {
    pub(super) fn add(&mut self, (from_append, from_send): (Spread, Spread)) {
        self.from_append.push(from_append);
        self.from_send.push(from_send);
    }

    pub(super) fn row(&self, table: &mut Table, what: &str, note: &str) {
        table.row(
            what,
            Spread::median(&self.from_append).to_string(),
            format!(
                "from the send, the append included: {}{note}",
                Spread::median(&self.from_send)
            ),
        );
    }
}

/// Starts `command(n)` for n in 0..commands at `rate` per second, each in a task of its own, and
/// gathers the (from append, from send) latencies each returns.
pub(super) async fn paced<F, Fut>(
    rate: f64,
    commands: usize,
    command: F,
) -> anyhow::Result<(Spread, Spread)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(Duration, Duration)>> + Send + 'static,
{
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = Instant::now();
    for n in 0..commands {
        tasks.spawn(command(n));
        next += interval;
        tokio::time::sleep_until(next.into()).await;
    }
    let (mut from_append, mut from_send) = (Vec::new(), Vec::new());
    while let Some(result) = tasks.join_next().await {
        let (appended, sent) = result??;
        from_append.push(appended);
        from_send.push(sent);
    }
    Ok((Spread::of(from_append), Spread::of(from_send)))
}

pub(super) async fn append(
    store: &dyn MessageStore,
    stream: &str,
    id: String,
) -> anyhow::Result<u64> {
    let written = store
        .commit(Commit::append(
            StreamName::parse(stream)?,
            None,
            vec![command(id, 1)],
        ))
        .await?;
    Ok(written.written.first().map_or(0, |m| m.global_position))
}

/// Row 2b: latency from a command's append to its handling being durable, at a steady rate.
pub(super) async fn end_to_end_latency(
    backend: &Backend,
    config: RunnerConfig,
    rate: f64,
    commands: usize,
) -> anyhow::Result<(Spread, Spread)> {
    let dir = tempfile::tempdir()?;
    let (store, running) = start_counter(dir.path(), backend, config, Handler::Wasm).await?;
    let handled = handled_position(&store).await?;
    let latencies = paced(rate, commands, |n| {
        let (store, handled) = (store.clone(), handled.clone());
        async move {
            let sent = Instant::now();
            let entity = format!("e{}", n % 100);
            let stream = format!("counter:command.{entity}");
            let global = append(store.as_ref(), &stream, format!("l{n}")).await?;
            let appended = Instant::now();
            wait_handled(handled, &entity, global).await?;
            anyhow::Ok((appended.elapsed(), sent.elapsed()))
        }
    })
    .await;
    running.shutdown().await;
    latencies
}

/// Row 2c: the store alone at the same rate: each command's append, then its outcome's append,
/// in series, through the host's store (its group commit and flush), with no consumer between.
/// The floor under the latency rows.
pub(super) async fn store_latency(rate: f64, commands: usize) -> anyhow::Result<(Spread, Spread)> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn MessageStore> = Arc::new(SledStore::open(dir.path().join("store"))?);
    paced(rate, commands, |n| {
        let store = store.clone();
        async move {
            let sent = Instant::now();
            let entity = n % 100;
            append(
                store.as_ref(),
                &format!("counter:command.e{entity}"),
                format!("l{n}"),
            )
            .await?;
            let appended = Instant::now();
            append(
                store.as_ref(),
                &format!("counter.e{entity}"),
                format!("o{n}"),
            )
            .await?;
            anyhow::Ok((appended.elapsed(), sent.elapsed()))
        }
    })
    .await
}

/// Pauses of this machine's cores, seen by a thread spinning on the clock on each core: a gap
/// between two readings is time the thread did not run.
#[derive(Default)]
pub(super) struct Pauses {
    pub(super) over_1_ms: usize,
    pub(super) over_5_ms: usize,
    /// Of those over 1 ms, the ones in which the guest's scheduler never switched the thread out
    /// (its involuntary context switches did not move): the core itself stopped, as when the
    /// hypervisor runs something else. This kind of guest reports no steal time.
    pub(super) under_the_guest: usize,
    pub(super) longest: Duration,
}

/// The involuntary context switches of the calling thread so far.
pub(super) fn switched_out() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("nonvoluntary_ctxt_switches:"))?
        .trim()
        .parse()
        .ok()
}

/// Spins a thread on each core for `duration` and gathers their pauses. A latency measured
/// through these cores is never shorter than a pause that falls in it.
pub(super) fn core_pauses(duration: Duration) -> Pauses {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let spinners: Vec<_> = (0..cores)
        .map(|_| {
            std::thread::spawn(move || {
                let mut pauses = Pauses::default();
                let start = Instant::now();
                let (mut last, mut switches) = (start, switched_out());
                while last - start < duration {
                    let now = Instant::now();
                    let now_switches = switched_out();
                    let gap = now - last;
                    if gap > Duration::from_millis(1) {
                        pauses.over_1_ms += 1;
                        pauses.under_the_guest += usize::from(now_switches == switches);
                    }
                    pauses.over_5_ms += usize::from(gap > Duration::from_millis(5));
                    pauses.longest = pauses.longest.max(gap);
                    (last, switches) = (Instant::now(), now_switches);
                }
                pauses
            })
        })
        .collect();
    spinners
        .into_iter()
        .filter_map(|spinner| spinner.join().ok())
        .fold(Pauses::default(), |all, one| Pauses {
            over_1_ms: all.over_1_ms + one.over_1_ms,
            over_5_ms: all.over_5_ms + one.over_5_ms,
            under_the_guest: all.under_the_guest + one.under_the_guest,
            longest: all.longest.max(one.longest),
        })
}
