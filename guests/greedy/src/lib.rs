//! A service that also imports `test:greedy/socket`, which no Ferry host offers. The host must
//! refuse it at load, naming the import, instead of failing later at a call.

wit_bindgen::generate!({
    path: ["../../wit", "wit"],
    world: "test:greedy/greedy",
    generate_all,
});

use exports::ferry::service::handler::Guest;
use ferry::service::types::{Failure, Message, Outcome, ServiceManifest};

struct Greedy;

impl Guest for Greedy {
    fn manifest() -> ServiceManifest {
        ServiceManifest {
            name: "greedy".into(),
            handles_commands: true,
            subscriptions: vec![],
            views: vec![],
        }
    }

    fn project(_state: Option<String>, _event: Message) -> Result<String, Failure> {
        Ok("{}".into())
    }

    fn handle_command(_command: Message, _state: Option<String>) -> Result<Outcome, Failure> {
        test::greedy::socket::connect("example.com:25").map_err(Failure::Transient)?;
        Ok(Outcome {
            messages: vec![],
            views: vec![],
        })
    }

    fn handle_event(_event: Message, _state: Option<String>) -> Result<Outcome, Failure> {
        Ok(Outcome {
            messages: vec![],
            views: vec![],
        })
    }
}

export!(Greedy);
