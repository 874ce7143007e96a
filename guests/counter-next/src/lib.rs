//! `counter-next`: the next version of the `counter` service, for the hot-reload tests. Same
//! service name, commands, events and view; its events say `handledBy: "counter-next"`.

const HANDLED_BY: &str = "counter-next";
const KEEPS_TOTALS: bool = true;

include!("../../counter/src/service.rs");
