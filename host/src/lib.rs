//! Ferry: a host for event-driven services whose business logic runs as sandboxed WebAssembly
//! components. See ARCHITECTURE.md for the map.

pub mod cli;
pub mod control;
pub mod dev;
pub mod files;
pub mod gateway;
pub mod mail;
pub mod reload;
pub mod scenario;
pub mod seal;
pub mod service;
pub mod store;
pub mod wasm;
