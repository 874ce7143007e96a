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
}

/// A [`GuestHost`] that offers nothing; used while reading a manifest.
struct NoHost;

impl GuestHost for NoHost {
    fn read_stream(&mut self, _: &str, _: u64) -> Result<Vec<Message>, String> {
        Err("not available while the manifest is read".into())
    }
    fn view_get(&mut self, _: &str, _: &str) -> Result<Option<String>, String> {
        Err("not available while the manifest is read".into())
    }
    fn new_id(&mut self, name: &str) -> String {
        name.to_owned()
    }
    fn deliver_email(&mut self, _: &str, _: &str) -> Result<(), String> {
        Err("not available while the manifest is read".into())
    }
}

struct MemoryCeiling {
    bytes: usize,
    exceeded: Option<String>,
}

impl ResourceLimiter for MemoryCeiling {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.bytes {
            let reason = format!(
                "linear memory would grow from {current} to {desired} bytes, past the limit of {} bytes",
                self.bytes
            );
            self.exceeded = Some(reason.clone());
            return Err(wasmtime::Error::msg(reason));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired.saturating_mul(size_of::<usize>()) <= self.bytes)
    }
}

struct GuestState {
    service: String,
    host: Box<dyn GuestHost>,
    memory: MemoryCeiling,
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wit::Host for GuestState {}

impl bindings::ferry::service::host::Host for GuestState {
    fn read_stream(
        &mut self,
        stream_name: String,
        from_position: u64,
    ) -> Result<Vec<wit::Message>, String> {
        let messages = self.host.read_stream(&stream_name, from_position)?;
        Ok(messages.iter().map(to_wit_message).collect())
    }

    fn view_get(&mut self, table: String, key: String) -> Result<Option<String>, String> {
        self.host.view_get(&table, &key)
    }

    fn new_id(&mut self, name: String) -> String {
        self.host.new_id(&name)
    }

    fn log(&mut self, level: wit::Level, text: String) {
        let text: String = text.chars().take(4096).collect();
        let service = &self.service;
        match level {
            wit::Level::Trace => tracing::trace!(target: "ferry::guest", %service, "{text}"),
            wit::Level::Debug => tracing::debug!(target: "ferry::guest", %service, "{text}"),
            wit::Level::Info => tracing::info!(target: "ferry::guest", %service, "{text}"),
            wit::Level::Warn => tracing::warn!(target: "ferry::guest", %service, "{text}"),
            wit::Level::Error => tracing::error!(target: "ferry::guest", %service, "{text}"),
        }
    }
}

impl bindings::ferry::service::mail::Host for GuestState {
    fn deliver(&mut self, email_id: String, message: String) -> Result<(), String> {
        self.host.deliver_email(&email_id, &message)
    }
}

fn to_wit_message(message: &Message) -> wit::Message {
    wit::Message {
        id: message.id.clone(),
        stream_name: message.stream.as_str().to_owned(),
        message_type: message.message_type.clone(),
        // Written straight to a string: the map is not cloned into a `Value` first.
        data: json_text(&message.data),
        metadata: json_text(&message.metadata),
        position: message.position,
        global_position: message.global_position,
        time_ms: message.time_ms,
    }
}

fn json_text(value: &impl serde::Serialize) -> String {
    // Serializing a `Value` or a map of them cannot fail (keys are strings).
    serde_json::to_string(value).unwrap_or_default()
}

fn from_wit_failure(failure: wit::Failure) -> GuestError {
    match failure {
        wit::Failure::Transient(reason) => GuestError::Transient(reason),
        wit::Failure::Permanent(reason) => GuestError::Permanent(reason),
    }
}

fn from_wit_outcome(outcome: wit::Outcome) -> Outcome {
    Outcome {
        messages: outcome
            .messages
            .into_iter()
            .map(|m| Outgoing {
                stream: m.stream_name,
                message_type: m.message_type,
                data: m.data,
                metadata: m.metadata,
                not_before_ms: m.not_before_ms,
            })
            .collect(),
        views: outcome
            .views
            .into_iter()
            .map(|change| match change {
                wit::ViewChange::Upsert(row) => ViewChange {
                    table: row.table,
                    key: row.key,
                    value: Some(row.value),
                },
                wit::ViewChange::Delete(key) => ViewChange {
                    table: key.table,
                    key: key.key,
                    value: None,
                },
            })
            .collect(),
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

/// The pool fresh instances come from, where the kernel can tell which pages a guest wrote
/// (`PAGEMAP_SCAN`, Linux 6.7): an instance then gets a memory that stays mapped and has only its
/// written pages reset, instead of a new mapping to fault in and unmap, which was about half the
/// cost of a fresh instance. Without it, resetting the kept bytes whole would cost more than a
/// new mapping, so instances are allocated on demand.
fn instance_pool() -> Option<PoolingAllocationConfig> {
    if !PoolingAllocationConfig::is_pagemap_scan_available() {
        return None;
    }
    let mut pool = PoolingAllocationConfig::new();
    // A component has several core instances and tables (its adapters'). Limits per component
    // keep the gate's count the one that runs out: a component beyond them is refused at load.
    // The JavaScript and Python toolchains' components fit these and wasmtime's per-module limits.
    let (memories, tables, core_instances) = (2, 8, 32);
    // The gate's pass is released after the store, so a slot is free before the count drops.
    pool.total_component_instances(LIVE_INSTANCES)
        .max_memories_per_component(memories)
        .max_tables_per_component(tables)
        .max_core_instances_per_component(core_instances)
        .total_memories(LIVE_INSTANCES * memories)
        .total_tables(LIVE_INSTANCES * tables)
        .total_core_instances(LIVE_INSTANCES * core_instances)
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT)
        .pagemap_scan(Enabled::Yes);
    Some(pool)
}

/// Counts live pooled instances and makes the one past its limit wait: a full pool is
/// back-pressure, not a failure that would park the message.
struct InstanceGate {
    limit: u32,
    live: Mutex<u32>,
    freed: Condvar,
}

impl InstanceGate {
    fn new(limit: u32) -> Self {
        Self {
            limit,
            live: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    fn enter(self: &Arc<Self>) -> GatePass {
        // The count stays right even if a holder panicked: it is only ever changed whole.
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        while *live >= self.limit {
            live = self
                .freed
                .wait(live)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *live += 1;
        GatePass(self.clone())
    }
}

/// One live instance's place in the [`InstanceGate`].
struct GatePass(Arc<InstanceGate>);

impl Drop for GatePass {
    fn drop(&mut self) {
        let mut live = self.0.live.lock().unwrap_or_else(PoisonError::into_inner);
        *live = live.saturating_sub(1);
        self.0.freed.notify_one();
    }
}

fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
}

/// One instance of a service. A Wasm instance lives in its own store; after a trap the store is
/// poisoned and every later call fails with the same kind of error, so callers drop the instance.
pub struct GuestInstance {
    service: String,
    body: Body,
}

enum Body {
    Wasm {
        store: Store<GuestState>,
        bindings: Option<bindings::Service>,
        timeout: Duration,
        /// Dropped after the store (fields drop in order), when its pool slots are free again.
        _pass: Option<GatePass>,
    },
    Native {
        code: Arc<dyn NativeService>,
        host: Box<dyn GuestHost>,
    },
}

impl std::fmt::Debug for GuestInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestInstance")
            .field("service", &self.service)
            .finish()
    }
}

impl GuestInstance {
    fn classify(&self, error: wasmtime::Error) -> GuestError {
        let Body::Wasm { store, timeout, .. } = &self.body else {
            return GuestError::Trap(format!("{error:#}"));
        };
        if let Some(reason) = &store.data().memory.exceeded {
            return GuestError::OutOfMemory(reason.clone());
        }
        if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return GuestError::Timeout(*timeout);
        }
        // Not the guest's doing, and not expected (the pool is sized so the gate runs out first):
        // should wasmtime refuse an instance anyway, try the message again later.
        if error.downcast_ref::<PoolConcurrencyLimitError>().is_some() {
            return GuestError::Transient(format!("no free instance: {error:#}"));
        }
        GuestError::Trap(format!("{error:#}"))
    }

    /// Calls into a Wasm instance with a fresh deadline; a trap, timeout or memory overrun
    /// becomes a [`GuestError`].
    fn call_wasm<T>(
        &mut self,
        f: impl FnOnce(
            &wit_handler::Guest,
            &mut Store<GuestState>,
        ) -> wasmtime::Result<Result<T, wit::Failure>>,
    ) -> Result<T, GuestError> {
        let Body::Wasm {
            store,
            bindings,
            timeout,
            ..
        } = &mut self.body
        else {
            return Err(GuestError::Trap("not a Wasm instance".into()));
        };
        let Some(service) = bindings else {
            return Err(GuestError::Trap("the instance was not created".into()));
        };
        store.set_epoch_deadline(deadline_ticks(*timeout));
        let handler = service.ferry_service_handler();
        match f(handler, store) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(failure)) => Err(from_wit_failure(failure)),
            Err(error) => Err(self.classify(error)),
        }
    }

    /// The name of the service this is an instance of.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Gives the instance a new host (the next message's view of the store), so that one healthy
    /// instance can handle several messages. Only for instances whose last call did not trap: a
    /// trap poisons the store and every later call fails.
    pub fn set_host(&mut self, new: Box<dyn GuestHost>) {
        match &mut self.body {
            Body::Wasm { store, .. } => store.data_mut().host = new,
            Body::Native { host, .. } => *host = new,
        }
    }

    pub fn manifest(&mut self) -> Result<Manifest, GuestError> {
        if let Body::Native { code, .. } = &self.body {
            return Ok(code.manifest());
        }
        let manifest = self.call_wasm(|h, s| h.call_manifest(s).map(Ok))?;
        Ok(Manifest {
            name: manifest.name,
            handles_commands: manifest.handles_commands,
            subscriptions: manifest
                .subscriptions
                .into_iter()
                .map(|s| Subscription {
                    category: s.category,
                    origin_prefix: s.origin_prefix,
                })
                .collect(),
            views: manifest.views,
        })
    }

    /// Folds one event into the state.
    pub fn project(&mut self, state: Option<&str>, event: &Message) -> Result<String, GuestError> {
        if let Body::Native { code, host } = &mut self.body {
            return code.project(host.as_mut(), state, event);
        }
        let event = to_wit_message(event);
        self.call_wasm(|h, s| h.call_project(s, state, &event))
    }

    pub fn handle_command(
        &mut self,
        command: &Message,
        state: Option<&str>,
    ) -> Result<Outcome, GuestError> {
        if let Body::Native { code, host } = &mut self.body {
            return code.handle_command(host.as_mut(), command, state);
        }
        let command = to_wit_message(command);
        self.call_wasm(|h, s| h.call_handle_command(s, &command, state))
            .map(from_wit_outcome)
    }

    pub fn handle_event(
        &mut self,
        event: &Message,
        state: Option<&str>,
    ) -> Result<Outcome, GuestError> {
        if let Body::Native { code, host } = &mut self.body {
            return code.handle_event(host.as_mut(), event, state);
        }
        let event = to_wit_message(event);
        self.call_wasm(|h, s| h.call_handle_event(s, &event, state))
            .map(from_wit_outcome)
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
