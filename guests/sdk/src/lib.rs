//! `ferry-sdk`: write a Ferry service in Rust without WIT plumbing.
//!
//! Implement [`Service`] on a type and call [`service!`] with it. Data and state are your own
//! serde types; the SDK turns the WIT strings into them and back.
//!
//! ```ignore
//! use ferry_sdk::{Message, Outcome, Result, Service, Manifest};
//!
//! struct Email;
//! impl Service for Email {
//!     type State = EmailState;
//!     fn manifest() -> Manifest { Manifest::new("email").handles_commands() }
//!     fn project(mut state: EmailState, event: &Message) -> Result<EmailState> {
//!         if event.is("EmailSent") { state.sent = true; }
//!         Ok(state)
//!     }
//!     fn handle_command(command: &Message, state: Option<EmailState>) -> Result<Outcome> { .. }
//! }
//! ferry_sdk::service!(Email);
//! ```

use serde::Serialize;
use serde::de::DeserializeOwned;
pub use serde_json::{Value, json};

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "service",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_guest",
        default_bindings_module: "ferry_sdk::bindings",
    });
}

use bindings::ferry::service::types as wit;

/// Why a handler produced no outcome: `Transient` is retried, `Permanent` parks the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Transient(String),
    Permanent(String),
}

/// A permanent failure with a reason.
pub fn permanent(reason: impl Into<String>) -> Failure {
    Failure::Permanent(reason.into())
}

/// A transient failure with a reason.
pub fn transient(reason: impl Into<String>) -> Failure {
    Failure::Transient(reason.into())
}

pub type Result<T> = std::result::Result<T, Failure>;

/// A delivered or stored message, with its JSON parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: String,
    pub stream: String,
    pub message_type: String,
    pub data: Value,
    pub metadata: Value,
    pub position: u64,
    pub global_position: u64,
    pub time_ms: u64,
}

impl Message {
    fn from_wit(message: wit::Message) -> Result<Self> {
        Ok(Self {
            data: parse(&message.data, "data")?,
            metadata: parse(&message.metadata, "metadata")?,
            id: message.id,
            stream: message.stream_name,
            message_type: message.message_type,
            position: message.position,
            global_position: message.global_position,
            time_ms: message.time_ms,
        })
    }

    /// Whether the message has this type.
    pub fn is(&self, message_type: &str) -> bool {
        self.message_type == message_type
    }

    /// The data as a typed struct; a mismatch is a permanent failure naming the field and the
    /// type expected (never the value found).
    pub fn data<T: DeserializeOwned>(&self) -> Result<T> {
        // Read from the parsed value in place: no copy of it first.
        serde_path_to_error::deserialize(&self.data).map_err(|e| {
            let path = e.path().to_string();
            permanent(describe(
                &format!("{} data", self.message_type),
                &path,
                &e.into_inner(),
            ))
        })
    }

    /// The entity id: the part of the stream name after the first `.`.
    pub fn entity_id(&self) -> &str {
        self.stream
            .split_once('.')
            .map(|(_, id)| id)
            .unwrap_or_default()
    }

    /// The `originEntity` metadata.
    pub fn origin_entity(&self) -> Option<&str> {
        self.metadata.get("originEntity").and_then(Value::as_str)
    }
}

fn parse<T: DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        permanent(describe(what, &path, &e.into_inner()))
    })
}

/// Why a JSON text did not give the type asked for: the field and what was expected, never the
/// value found, which may be a sealed field's clear value (a password sent as a number) and would
/// be stored with the parked message and written to the host's log.
fn describe(what: &str, path: &str, error: &serde_json::Error) -> String {
    let field = match path {
        "" | "." => String::new(),
        path => format!(" field `{path}`"),
    };
    if error.classify() != serde_json::error::Category::Data {
        // A syntax error's text names what was expected and where, not the value.
        return format!("{what} is not valid JSON: {error}");
    }
    let text = error.to_string();
    let text = text.split(" at line ").next().unwrap_or_default();
    if text.starts_with("missing field") || text.starts_with("unknown field") {
        return format!("{what}{field}: {text}");
    }
    match text.split_once(", expected ") {
        Some((_, expected)) => format!("{what}{field}: expected {expected}"),
        None => format!("{what}{field}: invalid value"),
    }
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// What a service says about itself.
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    name: String,
    handles_commands: bool,
    subscriptions: Vec<(String, Option<String>)>,
    views: Vec<String>,
}

impl Manifest {
    /// A service named `name`: it owns the event category `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// It consumes its command category `<name>:command`.
    pub fn handles_commands(mut self) -> Self {
        self.handles_commands = true;
        self
    }

    /// It consumes every event of a category.
    pub fn subscribe(mut self, category: &str) -> Self {
        self.subscriptions.push((category.into(), None));
        self
    }

    /// It consumes the events of a category whose `originEntity` starts with `prefix`.
    pub fn subscribe_origin(mut self, category: &str, prefix: &str) -> Self {
        self.subscriptions
            .push((category.into(), Some(prefix.into())));
        self
    }

    /// It writes this view table.
    pub fn view(mut self, table: &str) -> Self {
        self.views.push(table.into());
        self
    }
}

/// A message to write, built fluently.
#[derive(Debug, Clone)]
pub struct Write {
    stream: String,
    message_type: String,
    data: String,
    metadata: Option<String>,
    not_before_ms: Option<u64>,
}

impl Write {
    /// Extra metadata (a JSON object), merged over `originEntity`, `correlationId`, `causationId`.
    pub fn metadata(mut self, metadata: Value) -> Self {
        self.metadata = Some(metadata.to_string());
        self
    }

    /// Deliver no earlier than this time (milliseconds since the Unix epoch).
    pub fn not_before(mut self, time_ms: u64) -> Self {
        self.not_before_ms = Some(time_ms);
        self
    }
}

/// A message to write.
pub fn write(stream: impl Into<String>, message_type: &str, data: &impl Serialize) -> Write {
    Write {
        stream: stream.into(),
        message_type: message_type.into(),
        data: to_json(data),
        metadata: None,
        not_before_ms: None,
    }
}

/// What a handler decided: messages to write and view rows to change.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    messages: Vec<Write>,
    views: Vec<wit::ViewChange>,
}

impl Outcome {
    /// Nothing to do.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds a message.
    pub fn with(mut self, message: Write) -> Self {
        self.messages.push(message);
        self
    }

    /// Inserts or replaces a view row.
    pub fn upsert(mut self, table: &str, key: &str, value: &impl Serialize) -> Self {
        self.views.push(wit::ViewChange::Upsert(wit::ViewRow {
            table: table.into(),
            key: key.into(),
            value: to_json(value),
        }));
        self
    }

    /// Removes a view row.
    pub fn delete(mut self, table: &str, key: &str) -> Self {
        self.views.push(wit::ViewChange::Delete(wit::ViewKey {
            table: table.into(),
            key: key.into(),
        }));
        self
    }
}

/// What the host offers while a message is handled.
pub mod host {
    use super::{Message, Result, parse, permanent, transient};
    use crate::bindings::ferry::service::{host, mail, secrets, types::Level};
    use serde::de::DeserializeOwned;

    /// Every message of a stream, in order.
    pub fn read_stream(stream: &str) -> Result<Vec<Message>> {
        let mut all = Vec::new();
        loop {
            let page = host::read_stream(stream, all.len() as u64).map_err(transient)?;
            if page.is_empty() {
                return Ok(all);
            }
            for message in page {
                all.push(Message::from_wit(message)?);
            }
        }
    }

    /// A row of a view table, typed.
    pub fn view<T: DeserializeOwned>(table: &str, key: &str) -> Result<Option<T>> {
        match host::view_get(table, key).map_err(transient)? {
            Some(text) => parse(&text, "view row").map(Some),
            None => Ok(None),
        }
    }

    /// An id that is the same every time this message is handled.
    pub fn new_id(name: &str) -> String {
        host::new_id(name)
    }

    /// A secret (64 hex digits) that nobody can compute without the namespace's key, yet the
    /// same every time this message is handled: for a confirmation link's token, a reset code.
    pub fn secret(purpose: &str) -> Result<String> {
        secrets::derive(purpose).map_err(permanent)
    }

    pub fn info(text: &str) {
        host::log(Level::Info, text);
    }

    pub fn warn(text: &str) {
        host::log(Level::Warn, text);
    }

    /// Delivers an email (RFC 5322 text); only services granted the mail capability may.
    pub fn deliver_email(email_id: &str, message: &str) -> std::result::Result<(), String> {
        mail::deliver(email_id, message)
    }
}

/// A Ferry service. `State` is the entity's projected state; it starts as `State::default()`.
pub trait Service {
    type State: Serialize + DeserializeOwned + Default;

    fn manifest() -> Manifest;

    /// Folds one event of the entity's stream into the state.
    fn project(state: Self::State, _event: &Message) -> Result<Self::State> {
        Ok(state)
    }

    /// Handles a command; `state` is `None` when the entity has no events yet.
    fn handle_command(command: &Message, _state: Option<Self::State>) -> Result<Outcome> {
        Err(permanent(format!(
            "unknown command {}",
            command.message_type
        )))
    }

    /// Handles an event of a subscribed category.
    fn handle_event(_event: &Message, _state: Option<Self::State>) -> Result<Outcome> {
        Ok(Outcome::none())
    }
}

#[doc(hidden)]
pub mod adapter {
    use super::*;

    fn failure(failure: Failure) -> wit::Failure {
        match failure {
            Failure::Transient(reason) => wit::Failure::Transient(reason),
            Failure::Permanent(reason) => wit::Failure::Permanent(reason),
        }
    }

    fn outcome(outcome: Outcome) -> wit::Outcome {
        wit::Outcome {
            messages: outcome
                .messages
                .into_iter()
                .map(|m| wit::Outgoing {
                    stream_name: m.stream,
                    message_type: m.message_type,
                    data: m.data,
                    metadata: m.metadata,
                    not_before_ms: m.not_before_ms,
                })
                .collect(),
            views: outcome.views,
        }
    }

    fn state<S: Service>(state: Option<String>) -> Result<Option<S::State>> {
        state.map(|text| parse(&text, "state")).transpose()
    }

    pub fn manifest<S: Service>() -> wit::ServiceManifest {
        let m = S::manifest();
        wit::ServiceManifest {
            name: m.name,
            handles_commands: m.handles_commands,
            subscriptions: m
                .subscriptions
                .into_iter()
                .map(|(category, origin_prefix)| wit::Subscription {
                    category,
                    origin_prefix,
                })
                .collect(),
            views: m.views,
        }
    }

    pub fn project<S: Service>(
        state: Option<String>,
        event: wit::Message,
    ) -> std::result::Result<String, wit::Failure> {
        let run = || {
            let state = self::state::<S>(state)?.unwrap_or_default();
            S::project(state, &Message::from_wit(event)?).map(|s| to_json(&s))
        };
        run().map_err(failure)
    }

    pub fn handle_command<S: Service>(
        command: wit::Message,
        state: Option<String>,
    ) -> std::result::Result<wit::Outcome, wit::Failure> {
        let run = || S::handle_command(&Message::from_wit(command)?, self::state::<S>(state)?);
        run().map(outcome).map_err(failure)
    }

    pub fn handle_event<S: Service>(
        event: wit::Message,
        state: Option<String>,
    ) -> std::result::Result<wit::Outcome, wit::Failure> {
        let run = || S::handle_event(&Message::from_wit(event)?, self::state::<S>(state)?);
        run().map(outcome).map_err(failure)
    }
}

/// Exports a [`Service`] implementation as the component's `handler`.
#[macro_export]
macro_rules! service {
    ($service:ty) => {
        struct __FerryGuest;

        impl $crate::bindings::exports::ferry::service::handler::Guest for __FerryGuest {
            fn manifest() -> $crate::bindings::ferry::service::types::ServiceManifest {
                $crate::adapter::manifest::<$service>()
            }
            fn project(
                state: Option<String>,
                event: $crate::bindings::ferry::service::types::Message,
            ) -> ::core::result::Result<String, $crate::bindings::ferry::service::types::Failure> {
                $crate::adapter::project::<$service>(state, event)
            }
            fn handle_command(
                command: $crate::bindings::ferry::service::types::Message,
                state: Option<String>,
            ) -> ::core::result::Result<
                $crate::bindings::ferry::service::types::Outcome,
                $crate::bindings::ferry::service::types::Failure,
            > {
                $crate::adapter::handle_command::<$service>(command, state)
            }
            fn handle_event(
                event: $crate::bindings::ferry::service::types::Message,
                state: Option<String>,
            ) -> ::core::result::Result<
                $crate::bindings::ferry::service::types::Outcome,
                $crate::bindings::ferry::service::types::Failure,
            > {
                $crate::adapter::handle_event::<$service>(event, state)
            }
        }

        $crate::bindings::export_guest!(__FerryGuest with_types_in $crate::bindings);
    };
}
