//! The Wasm runtime: the only part of Ferry that touches wasmtime.
//!
//! It compiles and validates service components (caching precompiled code on disk by content hash
//! and engine compatibility), keeps one pre-instantiated template per component, and runs each
//! handled message in a fresh [`GuestInstance`] with its own limits: a memory ceiling, an epoch
//! deadline per call, and WASI that grants no files, network, environment or arguments. Whatever
//! the guest does, a call returns a value: a trap, a timeout or running out of memory becomes a
//! [`GuestError`].
//!
//! A [`NativeService`] (a service compiled into the host, for trusted code and for pricing the
//! sandbox) sits behind the same [`ServiceComponent`] and [`GuestInstance`], so the runner never
//! knows which kind it runs.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolConcurrencyLimitError,
    PoolingAllocationConfig, ResourceLimiter, Store, Trap,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::store::Message;

mod bindings {
    wasmtime::component::bindgen!({ world: "service", path: "../wit" });
}

use bindings::exports::ferry::service::handler as wit_handler;
use bindings::ferry::service::types as wit;

mod guest_state;
mod instance;

use self::guest_state::*;
pub use self::instance::GuestInstance;
use self::instance::*;

/// How often the engine's epoch advances; deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Upper bound of messages one `read-stream` call returns.
pub const READ_STREAM_LIMIT: usize = 1000;
/// Instances alive at once per [`Runtime`], where instances are pooled: a consumer lane holds at
/// most one. One more waits until an instance is dropped.
pub const LIVE_INSTANCES: u32 = 500;
/// Bytes of written pages of a pooled memory (or table) reset in place when an instance is
/// dropped; written pages past them are given back to the kernel. A Rust guest writes the top of
/// its 1 MiB stack and the data and heap above it: well within.
const KEEP_RESIDENT: usize = 2 << 20;

/// Limits applied to every instance of a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest time one call into the guest may run.
    pub call_timeout: Duration,
    /// Largest linear memory (and table space) the guest may grow to, in bytes.
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(1),
            memory_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Why a component could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("not a valid Wasm component: {0}")]
    Compile(String),
    #[error("the component imports something this host does not offer: {0}")]
    Import(String),
    #[error("the component does not implement the world ferry:service/service@0.1.0: {0}")]
    World(String),
    #[error("the component's manifest call failed: {0}")]
    Manifest(String),
}

/// Why a call into a guest gave no result. Every variant is a value the caller decides on; none
/// takes the host down.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestError {
    #[error("transient failure: {0}")]
    Transient(String),
    #[error("permanent failure: {0}")]
    Permanent(String),
    #[error("guest trapped: {0}")]
    Trap(String),
    #[error("guest ran past its deadline of {0:?}")]
    Timeout(Duration),
    #[error("guest exceeded its memory limit: {0}")]
    OutOfMemory(String),
}

/// A subscription from a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub category: String,
    pub origin_prefix: Option<String>,
}

/// What a component says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub handles_commands: bool,
    pub subscriptions: Vec<Subscription>,
    pub views: Vec<String>,
}

/// A message a handler asks to write, as the guest returned it (not yet checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub stream: String,
    pub message_type: String,
    pub data: String,
    pub metadata: Option<String>,
    pub not_before_ms: Option<u64>,
}

/// A view change as the guest returned it; `value: None` deletes the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewChange {
    pub table: String,
    pub key: String,
    pub value: Option<String>,
}

/// A handler's decision, as the guest returned it (not yet checked).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub messages: Vec<Outgoing>,
    pub views: Vec<ViewChange>,
}

/// What the host offers a guest during one handled message (the WIT `host` interface, minus
/// logging). The service runner implements it over the store.
pub trait GuestHost: Send {
    fn read_stream(&mut self, stream: &str, from_position: u64) -> Result<Vec<Message>, String>;
    fn view_get(&mut self, table: &str, key: &str) -> Result<Option<String>, String>;
    fn new_id(&mut self, name: &str) -> String;
    /// The `mail` capability; refused unless the service was granted it.
    fn deliver_email(&mut self, email_id: &str, message: &str) -> Result<(), String>;
    /// The `secrets` interface: an unguessable value, the same whenever the same message is
    /// handled.
    fn secret(&mut self, purpose: &str) -> Result<String, String>;
    /// A guest's log line as it may be written: a sealed command's clear values taken out.
    fn redact(&self, text: String) -> String {
        text
    }
}

/// Stops the epoch ticker thread when the last runtime handle goes away.
struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The engine, its linker and the precompiled-code cache. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<GuestState>>,
    cache_dir: Option<PathBuf>,
    /// Admits at most [`LIVE_INSTANCES`] when instances are pooled (see [`instance_pool`]).
    gate: Option<Arc<InstanceGate>>,
    _ticker: Arc<Ticker>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("cache_dir", &self.cache_dir)
            .finish()
    }
}

impl Runtime {
    /// A runtime whose precompiled code is cached in `cache_dir` (none: compile every time).
    pub fn new(cache_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        // `perf` can name guest functions when wasmtime writes a perf map of the code it compiled.
        if std::env::var_os("FERRY_PERF_MAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let on_demand = |config: &Config| Engine::new(config).map_err(|e| anyhow::anyhow!("{e:?}"));
        let (engine, gate) = match instance_pool() {
            Some(pool) => {
                let mut pooled = config.clone();
                pooled.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
                match Engine::new(&pooled) {
                    Ok(engine) => (engine, Some(Arc::new(InstanceGate::new(LIVE_INSTANCES)))),
                    // Its address space reserved up front may be refused (a limit on it).
                    Err(e) => {
                        tracing::warn!(
                            "instances are allocated on demand: no instance pool: {e:#}"
                        );
                        (on_demand(&config)?, None)
                    }
                }
            }
            None => (on_demand(&config)?, None),
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        bindings::Service::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        {
            // One ticker per engine drives every deadline; a weak handle lets it end with us.
            let engine = engine.weak();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ferry-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        match engine.upgrade() {
                            Some(engine) => engine.increment_epoch(),
                            None => break,
                        }
                    }
                })?;
        }
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            cache_dir,
            gate,
            _ticker: Arc::new(Ticker { stop }),
        })
    }

    /// Whether instances come from a pool, with at most [`LIVE_INSTANCES`] alive at once.
    pub fn pools_instances(&self) -> bool {
        self.gate.is_some()
    }

    /// Loads a component file.
    pub fn load_file(&self, path: &Path, limits: Limits) -> Result<ServiceComponent, LoadError> {
        let bytes = std::fs::read(path).map_err(|e| LoadError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        self.load(&bytes, limits)
    }

    /// Compiles (or takes from the cache), validates against the world and reads the manifest.
    pub fn load(&self, bytes: &[u8], limits: Limits) -> Result<ServiceComponent, LoadError> {
        let hash = content_hash(bytes);
        let component = self.compile_cached(bytes, &hash)?;
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Import(format!("{e:#}")))?;
        let pre = bindings::ServicePre::new(instance_pre)
            .map_err(|e| LoadError::World(format!("{e:#}")))?;
        let mut loaded = ServiceComponent {
            code: Code::Wasm {
                engine: self.engine.clone(),
                pre,
                gate: self.gate.clone(),
            },
            hash,
            limits,
            manifest: Manifest {
                name: String::new(),
                handles_commands: false,
                subscriptions: Vec::new(),
                views: Vec::new(),
            },
        };
        let mut instance = loaded
            .instantiate(Box::new(NoHost))
            .map_err(|e| LoadError::Manifest(e.to_string()))?;
        loaded.manifest = instance
            .manifest()
            .map_err(|e| LoadError::Manifest(e.to_string()))?;
        Ok(loaded)
    }

    fn compile_cached(&self, bytes: &[u8], hash: &str) -> Result<Component, LoadError> {
        let compile = || {
            Component::new(&self.engine, bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))
        };
        let Some(dir) = &self.cache_dir else {
            return compile();
        };
        let mut hasher = DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        let path = dir.join(format!("{hash}-{:016x}.cwasm", hasher.finish()));
        if path.exists() {
            match deserialize_own_file(&self.engine, &path) {
                Ok(component) => return Ok(component),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "precompiled code unusable, compiling again: {e}")
                }
            }
        }
        let component = compile()?;
        // A failed cache write only costs a compile next time.
        match component.serialize() {
            Ok(code) => {
                let partial = path.with_extension("partial");
                if let Err(e) =
                    std::fs::write(&partial, code).and_then(|()| std::fs::rename(&partial, &path))
                {
                    tracing::warn!(path = %path.display(), "cannot cache precompiled code: {e}");
                }
            }
            Err(e) => tracing::warn!("cannot serialize precompiled code: {e:#}"),
        }
        Ok(component)
    }
}

/// Loads precompiled code that this process's runtime wrote into its own cache folder.
#[allow(unsafe_code)]
fn deserialize_own_file(engine: &Engine, path: &Path) -> Result<Component, String> {
    // SAFETY: wasmtime trusts precompiled code; we only ever read files that `compile_cached`
    // wrote (via an atomic rename) into the cache folder, keyed by the engine's compatibility
    // hash, so the bytes came from this engine configuration.
    unsafe { Component::deserialize_file(engine, path) }.map_err(|e| format!("{e:#}"))
}

/// The sha-256 of a component's bytes, hex; names a component version.
pub fn content_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A service compiled into the host process instead of loaded as a component: the same contract
/// as the WIT world, behind the same [`ServiceComponent`] and [`GuestInstance`], so the runner
/// treats both alike. Without the sandbox there are no copies across it, no memory ceiling and no
/// deadline: only for trusted code. The benchmark runs one to show what the sandbox costs.
pub trait NativeService: Send + Sync + 'static {
    fn manifest(&self) -> Manifest;
    fn project(
        &self,
        host: &mut dyn GuestHost,
        state: Option<&str>,
        event: &Message,
    ) -> Result<String, GuestError>;
    fn handle_command(
        &self,
        host: &mut dyn GuestHost,
        command: &Message,
        state: Option<&str>,
    ) -> Result<Outcome, GuestError>;
    fn handle_event(
        &self,
        host: &mut dyn GuestHost,
        event: &Message,
        state: Option<&str>,
    ) -> Result<Outcome, GuestError>;
}

/// What instances of a service are made from.
#[derive(Clone)]
enum Code {
    Wasm {
        engine: Engine,
        pre: bindings::ServicePre<GuestState>,
        gate: Option<Arc<InstanceGate>>,
    },
    Native(Arc<dyn NativeService>),
}

/// A loaded, validated service version: the template every instance is made from.
#[derive(Clone)]
pub struct ServiceComponent {
    code: Code,
    hash: String,
    limits: Limits,
    manifest: Manifest,
}

impl std::fmt::Debug for ServiceComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceComponent")
            .field("name", &self.manifest.name)
            .field("hash", &self.hash)
            .finish()
    }
}

impl ServiceComponent {
    /// A service compiled into the host; its version is named by its manifest's name.
    pub fn native(service: Arc<dyn NativeService>) -> Self {
        let manifest = service.manifest();
        Self {
            hash: content_hash(format!("native:{}", manifest.name).as_bytes()),
            code: Code::Native(service),
            limits: Limits::default(),
            manifest,
        }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The sha-256 of the component's bytes.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The same component with other limits (per-service configuration).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// A fresh instance in its own store, for one handled message.
    pub fn instantiate(&self, host: Box<dyn GuestHost>) -> Result<GuestInstance, GuestError> {
        let (engine, pre, gate) = match &self.code {
            Code::Wasm { engine, pre, gate } => (engine, pre, gate),
            Code::Native(service) => {
                return Ok(GuestInstance {
                    service: self.manifest.name.clone(),
                    body: Body::Native {
                        code: service.clone(),
                        host,
                    },
                });
            }
        };
        let state = GuestState {
            service: self.manifest.name.clone(),
            host,
            memory: MemoryCeiling {
                bytes: self.limits.memory_bytes,
                exceeded: None,
            },
            // Grants nothing: no files, network, environment or arguments.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        };
        // Waits, when the pool is at its limit, until an instance is dropped.
        let pass = gate.as_ref().map(InstanceGate::enter);
        let mut store = Store::new(engine, state);
        store.limiter(|state| &mut state.memory);
        store.set_epoch_deadline(deadline_ticks(self.limits.call_timeout));
        let bindings = pre.instantiate(&mut store);
        let mut instance = GuestInstance {
            service: self.manifest.name.clone(),
            body: Body::Wasm {
                store,
                bindings: None,
                timeout: self.limits.call_timeout,
                _pass: pass,
            },
        };
        match bindings {
            Ok(service) => {
                if let Body::Wasm { bindings, .. } = &mut instance.body {
                    *bindings = Some(service);
                }
                Ok(instance)
            }
            Err(e) => Err(instance.classify(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn the_gate_lets_the_one_past_its_limit_wait_for_a_free_place() {
        let gate = Arc::new(InstanceGate::new(2));
        let first = gate.enter();
        let _second = gate.enter();
        let (entered, waiting) = mpsc::channel();
        let third = gate.clone();
        std::thread::spawn(move || {
            let _pass = third.enter();
            let _ = entered.send(());
        });
        assert_eq!(
            waiting.recv_timeout(Duration::from_millis(200)),
            Err(mpsc::RecvTimeoutError::Timeout),
            "a third entered a gate of two"
        );
        drop(first);
        waiting
            .recv_timeout(Duration::from_secs(10))
            .expect("the third enters once a place is free");
    }
}
