//! `ferry rebuild TABLE`: in the running host through its socket, or here, with progress.

use super::*;

/// Where a rebuild runs: in the running host, or in this process.
pub(super) enum Rebuilder<'a> {
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
pub(super) async fn rebuild(
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
pub(super) async fn follow_rebuild(
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
