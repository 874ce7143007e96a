//! `ferry dev`: a folder of service sources, kept built, tested and running. Each subfolder is a
//! service as `ferry new` writes it (`Cargo.toml`: Rust; `app.js`: JavaScript; `app.py`:
//! Python). A service is built when `dev` starts and again after each burst of changes to its
//! sources; the new component's scenarios (`scenarios.toml` beside it) run through
//! [`crate::scenario`], and only a component that passes them is copied into the services
//! folder, where the running host's hot reload takes it over. A build or a scenario that fails
//! is shown, and the version that ran keeps running. One line per rebuild says how it went and
//! how long it took.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use notify::Watcher as _;
use tokio::sync::mpsc;

use crate::wasm::{Limits, Runtime};
use crate::{control, scenario};

/// How long a service's sources must be quiet before it is built (an editor's save, a
/// formatter's rewrite).
const QUIET: Duration = Duration::from_millis(300);

/// Folders a build writes into; a change there is not a change of the sources.
const BUILD_OUTPUT: &[&str] = &["target", "node_modules", ".venv", "__pycache__"];

/// How a service's sources become a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toolchain {
    /// `cargo build --release --target wasm32-wasip2`.
    Rust,
    /// componentize-js, from the folder's `node_modules` or `PATH`.
    Js,
    /// componentize-py, from the folder's `.venv` or `PATH`.
    Python,
}

impl Toolchain {
    /// The toolchain of a service folder, if it is one.
    pub fn of(folder: &Path) -> Option<Self> {
        if folder.join("Cargo.toml").is_file() {
            Some(Self::Rust)
        } else if folder.join("app.js").is_file() {
            Some(Self::Js)
        } else if folder.join("app.py").is_file() {
            Some(Self::Python)
        } else {
            None
        }
    }
}

/// How one rebuild went.
#[derive(Debug)]
pub enum Rebuilt {
    /// Built, every scenario passed, copied into the services folder.
    Installed {
        scenarios: usize,
        /// The service's name and the new component's version (content hash).
        service: String,
        version: String,
    },
    /// Built, but a scenario failed: not installed.
    ScenariosFailed(Vec<scenario::ScenarioResult>),
    /// The build failed, with the tool's output.
    BuildFailed(String),
}

/// The service folders under `sources`.
pub fn service_folders(sources: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut folders: Vec<PathBuf> = std::fs::read_dir(sources)
        .with_context(|| format!("cannot read the sources folder {}", sources.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| Toolchain::of(path).is_some())
        .collect();
    folders.sort();
    Ok(folders)
}

/// The service's name: its folder's.
fn name_of(folder: &Path) -> String {
    folder
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Builds a service folder; the component, or the tool's output when it failed.
pub fn build(folder: &Path) -> Result<PathBuf, String> {
    let toolchain = Toolchain::of(folder).ok_or("not a service folder")?;
    let name = name_of(folder);
    let local = |path: &str, tool: &str| {
        let local = folder.join(path).join(tool);
        if local.exists() {
            local
        } else {
            PathBuf::from(tool)
        }
    };
    let (mut command, component) = match toolchain {
        Toolchain::Rust => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| folder.join("target"), PathBuf::from);
            let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
            cargo.args(["build", "--release", "--quiet", "--target", "wasm32-wasip2"]);
            let file = format!("wasm32-wasip2/release/{}.wasm", name.replace('-', "_"));
            (cargo, target.join(file))
        }
        Toolchain::Js => {
            let mut js = Command::new(local("node_modules/.bin", "componentize-js"));
            js.args(["app.js", "--wit", "wit", "-n", "service", "-o"])
                .arg(format!("{name}.wasm"))
                .args(["-d", "stdio", "random", "clocks", "http", "fetch-event"]);
            (js, folder.join(format!("{name}.wasm")))
        }
        Toolchain::Python => {
            let mut py = Command::new(local(".venv/bin", "componentize-py"));
            py.args(["-d", "wit", "-w", "service", "componentize", "app", "-o"])
                .arg(format!("{name}.wasm"));
            (py, folder.join(format!("{name}.wasm")))
        }
    };
    let output = command
        .current_dir(folder)
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", command.get_program()))?;
    if !output.status.success() {
        let mut said = String::from_utf8_lossy(&output.stderr).into_owned();
        said.push_str(&String::from_utf8_lossy(&output.stdout));
        return Err(said);
    }
    Ok(component)
}

/// Builds a service, runs its scenarios against the new component, and installs it into
/// `services` (atomically: a rename) when they pass.
pub async fn rebuild(runtime: &Runtime, folder: &Path, services: &Path) -> anyhow::Result<Rebuilt> {
    let built = {
        let folder = folder.to_path_buf();
        tokio::task::spawn_blocking(move || build(&folder))
            .await
            .context("the build thread failed")?
    };
    let component_path = match built {
        Ok(path) => path,
        Err(said) => return Ok(Rebuilt::BuildFailed(said)),
    };
    let component = match runtime.load_file(&component_path, Limits::default()) {
        Ok(component) => component,
        Err(e) => {
            return Ok(Rebuilt::BuildFailed(format!(
                "the component cannot run: {e}"
            )));
        }
    };
    let scenarios = folder.join("scenarios.toml");
    let results = if scenarios.exists() {
        scenario::run_files(&component_path, &component, &[scenarios]).await?
    } else {
        Vec::new()
    };
    if results.iter().any(|r| !r.passed) {
        return Ok(Rebuilt::ScenariosFailed(results));
    }
    std::fs::create_dir_all(services)
        .with_context(|| format!("cannot create {}", services.display()))?;
    let name = component.manifest().name.clone();
    let staged = services.join(format!(".{name}.wasm.tmp"));
    std::fs::copy(&component_path, &staged)
        .with_context(|| format!("cannot copy into {}", services.display()))?;
    std::fs::rename(&staged, services.join(format!("{name}.wasm")))
        .with_context(|| format!("cannot install into {}", services.display()))?;
    Ok(Rebuilt::Installed {
        scenarios: results.len(),
        service: name,
        version: component.hash().to_owned(),
    })
}

/// Rebuilds one service and prints the line (and, on failure, what failed). "Running it" is said
/// only once the host of `data` runs the new version, so a message sent after the line meets it.
async fn rebuild_and_tell(runtime: &Runtime, folder: &Path, services: &Path, data: &Path) {
    let started = Instant::now();
    let name = name_of(folder);
    let took = || format!("{:.1} s", started.elapsed().as_secs_f64());
    match rebuild(runtime, folder, services).await {
        Ok(Rebuilt::Installed {
            scenarios,
            service,
            version,
        }) => {
            let passed = format!(
                "{name}: built in {}, {scenarios} scenario(s) passed",
                took()
            );
            match runs(data, &service, &version).await {
                true => println!("{passed}, running it"),
                false => println!(
                    "{passed}, installed; the host has not taken it up after {} s (see its log)",
                    TAKE_UP.as_secs()
                ),
            }
        }
        Ok(Rebuilt::ScenariosFailed(results)) => {
            scenario::print(&results, false);
            let failed = results.iter().filter(|r| !r.passed).count();
            println!(
                "{name}: built in {}, {failed} of {} scenario(s) failed; the running version stays",
                took(),
                results.len()
            );
        }
        Ok(Rebuilt::BuildFailed(said)) => {
            println!("{}", said.trim_end());
            println!(
                "{name}: the build failed after {}; the running version stays",
                took()
            );
        }
        Err(e) => println!("{name}: {e:#}; the running version stays"),
    }
}

/// How long a rebuild waits for the host to run the version it installed.
const TAKE_UP: Duration = Duration::from_secs(10);

/// Whether the host of `data` runs `version` of `service`, waiting up to [`TAKE_UP`] for its hot
/// reload (asked through its control socket).
async fn runs(data: &Path, service: &str, version: &str) -> bool {
    let deadline = Instant::now() + TAKE_UP;
    while Instant::now() < deadline {
        if let Ok(Some(answer)) = control::try_remote(data, &control::Request::Services).await
            && answer["services"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["name"] == service && s["version"] == version)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Builds every service under `sources` once, then again whenever its sources change, until
/// the returned task is aborted. `data` is the folder of the host that runs them.
pub fn watch(
    runtime: Runtime,
    sources: PathBuf,
    services: PathBuf,
    data: PathBuf,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    // The watcher reports absolute paths: the folder is compared with them in that form.
    let sources = sources
        .canonicalize()
        .with_context(|| format!("cannot find the sources folder {}", sources.display()))?;
    let (changed, mut changes) = mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Writes, creations, removals and renames; not the reads a build itself makes.
        if let Ok(event) = event
            && !matches!(event.kind, notify::EventKind::Access(_))
        {
            for path in event.paths {
                let _ = changed.send(path);
            }
        }
    })
    .context("cannot watch the sources")?;
    watcher
        .watch(&sources, notify::RecursiveMode::Recursive)
        .with_context(|| format!("cannot watch {}", sources.display()))?;
    Ok(tokio::spawn(async move {
        let _watcher = watcher;
        if let Ok(folders) = service_folders(&sources) {
            for folder in folders {
                rebuild_and_tell(&runtime, &folder, &services, &data).await;
            }
        }
        while let Some(first) = changes.recv().await {
            let mut touched = vec![first];
            loop {
                tokio::time::sleep(QUIET).await;
                let before = touched.len();
                while let Ok(path) = changes.try_recv() {
                    touched.push(path);
                }
                if touched.len() == before {
                    break;
                }
            }
            let folders: HashSet<PathBuf> = touched
                .iter()
                .filter_map(|path| service_of(&sources, path))
                .collect();
            let mut folders: Vec<PathBuf> = folders.into_iter().collect();
            folders.sort();
            for folder in folders {
                rebuild_and_tell(&runtime, &folder, &services, &data).await;
            }
        }
    }))
}

/// The service folder a changed path belongs to, unless it is build output.
fn service_of(sources: &Path, path: &Path) -> Option<PathBuf> {
    let relative = path.strip_prefix(sources).ok()?;
    let mut parts = relative.components();
    let folder = sources.join(parts.next()?);
    let rest: Vec<String> = parts
        .map(|part| part.as_os_str().to_string_lossy().into_owned())
        .collect();
    let output = rest
        .iter()
        .any(|part| BUILD_OUTPUT.contains(&part.as_str()))
        // The lockfile is written by the first build itself.
        || rest
            .last()
            .is_some_and(|file| file.ends_with(".wasm") || file == "Cargo.lock");
    (!rest.is_empty() && !output && Toolchain::of(&folder).is_some()).then_some(folder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_belongs_to_its_service_unless_it_is_build_output() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sources = dir.path();
        let service = sources.join("tally");
        std::fs::create_dir_all(service.join("src")).expect("folder");
        std::fs::write(service.join("Cargo.toml"), "").expect("file");
        assert_eq!(
            service_of(sources, &service.join("src/lib.rs")),
            Some(service.clone())
        );
        assert_eq!(
            service_of(sources, &service.join("scenarios.toml")),
            Some(service.clone())
        );
        for output in [
            "target/x/y.rlib",
            "tally.wasm",
            "Cargo.lock",
            "node_modules/a.js",
            ".venv/bin/x",
        ] {
            assert_eq!(service_of(sources, &service.join(output)), None, "{output}");
        }
        assert_eq!(service_of(sources, &sources.join("elsewhere/file")), None);
    }
}
