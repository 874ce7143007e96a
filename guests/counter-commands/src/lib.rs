//! `counter-commands`: the `counter` service without its subscription to its own events, so a
//! command costs exactly what the benchmark's end-to-end row defines: the command delivered, its
//! entity projected, `handle-command` called, the event and the position written.

const HANDLED_BY: &str = "counter";
const KEEPS_TOTALS: bool = false;

include!("../../counter/src/service.rs");
