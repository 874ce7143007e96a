//! Hot reload: watches the services folder and brings the running services in line with it
//! while the host runs.
//!
//! One mechanism for every change: after the folder has been quiet for a moment, [`sync`] reads
//! it again and compares each file's content hash with the version running from that path. A new
//! component is loaded and started; a changed one is compiled and validated first, then the old
//! version's consumers stop between two messages (the message in flight finishes on it) and the
//! new version's start from the stored positions; a removed one stops and keeps its positions. A
//! component that does not load, or clashes with another service, is refused with a log line and
//! whatever ran from its path keeps running.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use notify::Watcher as _;
use tokio::sync::{Mutex, mpsc};

use crate::service::{self, LoadedService, Running};
use crate::wasm::{Limits, Runtime, content_hash};

/// How long the folder must be quiet before it is read again (a copy in progress, an editor's
/// write-then-rename).
const QUIET: Duration = Duration::from_millis(250);

/// Turns a freshly loaded component into what runs (per-service limits, for instance).
pub type Prepare = Arc<dyn Fn(LoadedService) -> LoadedService + Send + Sync>;

/// What a reload needs: where the components are and how to load them.
#[derive(Clone)]
pub struct Reloader {
    pub folder: PathBuf,
    pub runtime: Runtime,
    pub limits: Limits,
    /// Run only these services (all when empty).
    pub only: Vec<String>,
    pub prepare: Prepare,
}

/// What one [`sync`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub started: Vec<String>,
    pub replaced: Vec<String>,
    pub stopped: Vec<String>,
    pub refused: Vec<PathBuf>,
}

/// Reads the services folder and applies the difference to `running`.
pub async fn sync(reloader: &Reloader, running: &mut Running) -> anyhow::Result<Changes> {
    let mut changes = Changes::default();
    let current = running.table().list();
    let running_at = |path: &Path| current.iter().find(|s| s.path == path);

    let mut paths: Vec<PathBuf> = std::fs::read_dir(&reloader.folder)
        .with_context(|| format!("cannot read {}", reloader.folder.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm"))
        .collect();
    paths.sort();

    // Unchanged components first, so that a new one clashing with them is the one refused.
    let mut unchanged = Vec::new();
    let mut fresh = Vec::new();
    for path in paths {
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot read the component: {e}");
                continue;
            }
        };
        if let Some(info) = running_at(&path).filter(|s| s.component.hash() == content_hash(&bytes))
        {
            unchanged.push(LoadedService {
                path,
                component: (*info.component).clone(),
            });
            continue;
        }
        let runtime = reloader.runtime.clone();
        let limits = reloader.limits;
        let loaded = tokio::task::spawn_blocking(move || runtime.load(&bytes, limits)).await?;
        match loaded {
            Ok(component)
                if !reloader.only.is_empty()
                    && !reloader.only.contains(&component.manifest().name) =>
            {
                tracing::debug!(path = %path.display(), "not one of the --only services");
            }
            Ok(component) => fresh.push((reloader.prepare)(LoadedService { path, component })),
            Err(e) => {
                let previous = running_at(&path);
                refuse(&path, &anyhow::Error::new(e), previous.is_some());
                if let Some(previous) = previous {
                    unchanged.push(LoadedService {
                        path: path.clone(),
                        component: (*previous.component).clone(),
                    });
                }
                changes.refused.push(path);
            }
        }
    }
    let (mut admitted, refused) = service::admit(unchanged.into_iter().chain(fresh).collect());
    for (path, error) in refused {
        let previous = running_at(&path);
        refuse(&path, &error, previous.is_some());
        if let Some(previous) = previous {
            admitted.push(LoadedService {
                path: path.clone(),
                component: (*previous.component).clone(),
            });
        }
        changes.refused.push(path);
    }

    let wanted: HashMap<String, &LoadedService> = admitted
        .iter()
        .map(|s| (s.component.manifest().name.clone(), s))
        .collect();
    for info in &current {
        if !wanted.contains_key(&info.name) {
            running.stop(&info.name).await;
            changes.stopped.push(info.name.clone());
        }
    }
    for (name, service) in wanted {
        match current.iter().find(|s| s.name == name) {
            Some(info) if info.component.hash() == service.component.hash() => {}
            Some(info) => {
                running.stop(&name).await;
                running.add(service)?;
                tracing::info!(
                    service = %name,
                    from = %&info.component.hash()[..12],
                    to = %&service.component.hash()[..12],
                    "service replaced by a new version"
                );
                changes.replaced.push(name);
            }
            None => {
                running.add(service)?;
                changes.started.push(name);
            }
        }
    }
    Ok(changes)
}

fn refuse(path: &Path, error: &anyhow::Error, keeps_running: bool) {
    if keeps_running {
        tracing::error!(
            path = %path.display(),
            "component refused, the version running from this path keeps running: {error:#}"
        );
    } else {
        tracing::error!(path = %path.display(), "component refused: {error:#}");
    }
}

/// Watches the services folder and calls [`sync`] after every burst of changes, until the
/// returned task is aborted.
pub fn watch(
    reloader: Reloader,
    running: Arc<Mutex<Running>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (wake, mut woken) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = wake.send(());
        }
    })
    .context("cannot watch the services folder")?;
    watcher
        .watch(&reloader.folder, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", reloader.folder.display()))?;
    Ok(tokio::spawn(async move {
        // Owned by the task: dropping it stops the watching.
        let _watcher = watcher;
        while woken.recv().await.is_some() {
            loop {
                tokio::time::sleep(QUIET).await;
                let mut more = false;
                while woken.try_recv().is_ok() {
                    more = true;
                }
                if !more {
                    break;
                }
            }
            let mut running = running.lock().await;
            if let Err(e) = sync(&reloader, &mut running).await {
                tracing::error!("reload failed: {e:#}");
            }
        }
    }))
}
