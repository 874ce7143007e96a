//! `counter`: a small well-behaved service used by the host's tests.
//!
//! - `Increment { by }` on `counter:command.<id>` → `Incremented { by, total }` on `counter.<id>`,
//!   where `total` comes from the projected state (so tests see the projection was passed in).
//! - `Schedule { by, delayMs }` → an `Increment { by }` command to itself, not before `delayMs`
//!   after the `Schedule` was written.
//! - It subscribes to its own events and keeps the view `totals` (`<id>` → `{ "total": n }`).
//!
//! Every event carries `handledBy: "counter"` in its metadata; `counter-next` is the same service
//! saying `counter-next`, so the hot-reload tests see which version handled a message.

const HANDLED_BY: &str = "counter";
const KEEPS_TOTALS: bool = true;

include!("service.rs");
