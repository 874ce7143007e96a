//! `tally`: counts every `Count` command, of whichever entity, into one view row
//! (`tallies` / `all` → `{ "count": n }`), read with `view-get` and written back: the
//! read-modify-write that several instances of a service, each owning other entities, must not
//! lose an update of (the host checks the row's revision in the commit).

use ferry_sdk::{Manifest, Message, Outcome, Result, Service, host, json, permanent};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
struct Tally {
    count: u64,
}

struct Tallies;

impl Service for Tallies {
    type State = ();

    fn manifest() -> Manifest {
        Manifest::new("tally").handles_commands().view("tallies")
    }

    fn handle_command(command: &Message, _state: Option<()>) -> Result<Outcome> {
        if command.message_type != "Count" {
            return Err(permanent(format!(
                "unknown command {}",
                command.message_type
            )));
        }
        let tally = host::view::<Tally>("tallies", "all")?.unwrap_or_default();
        Ok(Outcome::none().upsert("tallies", "all", &json!({ "count": tally.count + 1 })))
    }
}

ferry_sdk::service!(Tallies);
