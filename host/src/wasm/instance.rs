//! Fresh instances: the pooling allocator, the gate that bounds how many live at once, and a
//! [`GuestInstance`], one handled message's sandbox with its deadline and memory ceiling.

use super::*;

/// The pool fresh instances come from, where the kernel can tell which pages a guest wrote
/// (`PAGEMAP_SCAN`, Linux 6.7): an instance then gets a memory that stays mapped and has only its
/// written pages reset, instead of a new mapping to fault in and unmap, which was about half the
/// cost of a fresh instance. Without it, resetting the kept bytes whole would cost more than a
/// new mapping, so instances are allocated on demand.
pub(super) fn instance_pool() -> Option<PoolingAllocationConfig> {
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
pub(super) struct InstanceGate {
    pub(super) limit: u32,
    pub(super) live: Mutex<u32>,
    pub(super) freed: Condvar,
}

impl InstanceGate {
    pub(super) fn new(limit: u32) -> Self {
        Self {
            limit,
            live: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    pub(super) fn enter(self: &Arc<Self>) -> GatePass {
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
pub(super) struct GatePass(Arc<InstanceGate>);

impl Drop for GatePass {
    fn drop(&mut self) {
        let mut live = self.0.live.lock().unwrap_or_else(PoisonError::into_inner);
        *live = live.saturating_sub(1);
        self.0.freed.notify_one();
    }
}

pub(super) fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
}

/// One instance of a service. A Wasm instance lives in its own store; after a trap the store is
/// poisoned and every later call fails with the same kind of error, so callers drop the instance.
pub struct GuestInstance {
    pub(super) service: String,
    pub(super) body: Body,
}

pub(super) enum Body {
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
    pub(super) fn classify(&self, error: wasmtime::Error) -> GuestError {
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
    pub(super) fn call_wasm<T>(
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
