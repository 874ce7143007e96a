//! Stream and category names: parsing and validation.
//!
//! A stream name is `<category>.<id>`; a category is a service name, optionally followed by
//! `:command` for the service's command category (`email`, `email:command`) or `:outbox` for the
//! effects its handlers decided, which the host performs after their commit (`email:outbox`,
//! written only by the host). Names map one to one
//! onto NATS subjects later, so they exclude whitespace, `.` inside parts, and the wildcards `*`
//! and `>`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The suffix that marks a command category.
pub const COMMAND_SUFFIX: &str = ":command";
/// The suffix that marks an outbox category: effects decided by a service's handlers (an email),
/// recorded by their commit and performed by the host after it.
pub const OUTBOX_SUFFIX: &str = ":outbox";

/// The service a category name belongs to, without its `:command` or `:outbox` suffix.
fn service_part(category: &str) -> &str {
    category
        .strip_suffix(COMMAND_SUFFIX)
        .or_else(|| category.strip_suffix(OUTBOX_SUFFIX))
        .unwrap_or(category)
}

const MAX_SERVICE_LEN: usize = 64;
const MAX_ID_LEN: usize = 200;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} name {name:?}: {reason}")]
pub struct NameError {
    pub kind: &'static str,
    pub name: String,
    pub reason: &'static str,
}

fn name_error(kind: &'static str, name: &str, reason: &'static str) -> NameError {
    NameError {
        kind,
        name: name.chars().take(120).collect(),
        reason,
    }
}

/// Checks a service name: starts with a letter; letters, digits, `-` and `_`; at most 64 bytes.
pub fn validate_service_name(name: &str) -> Result<(), NameError> {
    const KIND: &str = "service";
    let mut chars = name.chars();
    match chars.next() {
        None => return Err(name_error(KIND, name, "it is empty")),
        Some(c) if !c.is_ascii_alphabetic() => {
            return Err(name_error(KIND, name, "it must start with a letter"));
        }
        _ => {}
    }
    if name.len() > MAX_SERVICE_LEN {
        return Err(name_error(KIND, name, "it is longer than 64 bytes"));
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(name_error(
            KIND,
            name,
            "only letters, digits, '-' and '_' are allowed",
        ));
    }
    Ok(())
}

/// Checks a view table name (same rules as a service name).
pub fn validate_table_name(name: &str) -> Result<(), NameError> {
    validate_service_name(name).map_err(|e| NameError {
        kind: "view table",
        ..e
    })
}

/// A category: `email` (events of the email service), `email:command` (its commands) or
/// `email:outbox` (the emails its handlers decided to send).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Category(String);

impl Category {
    pub fn parse(name: &str) -> Result<Self, NameError> {
        validate_service_name(service_part(name)).map_err(|e| NameError {
            kind: "category",
            name: name.chars().take(120).collect(),
            ..e
        })?;
        Ok(Self(name.to_owned()))
    }

    /// The event category a service owns.
    pub fn events_of(service: &str) -> Result<Self, NameError> {
        validate_service_name(service)?;
        Ok(Self(service.to_owned()))
    }

    /// The command category a service consumes.
    pub fn commands_of(service: &str) -> Result<Self, NameError> {
        validate_service_name(service)?;
        Ok(Self(format!("{service}{COMMAND_SUFFIX}")))
    }

    /// The outbox of a service: the effects its handlers decided.
    pub fn outbox_of(service: &str) -> Result<Self, NameError> {
        validate_service_name(service)?;
        Ok(Self(format!("{service}{OUTBOX_SUFFIX}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The service the category belongs to: `email` for `email`, `email:command` and
    /// `email:outbox`.
    pub fn service(&self) -> &str {
        service_part(&self.0)
    }

    pub fn is_command(&self) -> bool {
        self.0.ends_with(COMMAND_SUFFIX)
    }

    pub fn is_outbox(&self) -> bool {
        self.0.ends_with(OUTBOX_SUFFIX)
    }

    /// The stream of one entity of this category.
    pub fn stream(&self, id: &str) -> Result<StreamName, NameError> {
        StreamName::parse(&format!("{}.{id}", self.0))
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Category {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Category> for String {
    fn from(value: Category) -> Self {
        value.0
    }
}

/// A stream name: `<category>.<id>`, such as `email.0082b815` or `email:command.0082b815`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamName {
    full: String,
    dot: usize,
}

impl StreamName {
    pub fn parse(name: &str) -> Result<Self, NameError> {
        const KIND: &str = "stream";
        let Some(dot) = name.find('.') else {
            return Err(name_error(
                KIND,
                name,
                "expected <category>.<id>, such as user.42 or user:command.42",
            ));
        };
        Category::parse(&name[..dot]).map_err(|e| NameError {
            kind: KIND,
            name: name.chars().take(120).collect(),
            ..e
        })?;
        let id = &name[dot + 1..];
        if id.is_empty() {
            return Err(name_error(KIND, name, "the id after '.' is empty"));
        }
        if id.len() > MAX_ID_LEN {
            return Err(name_error(KIND, name, "the id is longer than 200 bytes"));
        }
        if !id
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '.' | '*' | '>'))
        {
            return Err(name_error(
                KIND,
                name,
                "the id may hold printable ASCII except '.', '*' and '>'",
            ));
        }
        Ok(Self {
            full: name.to_owned(),
            dot,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }

    pub fn category(&self) -> Category {
        Category(self.full[..self.dot].to_owned())
    }

    pub fn category_str(&self) -> &str {
        &self.full[..self.dot]
    }

    /// The entity id, the part after the first `.`.
    pub fn id(&self) -> &str {
        &self.full[self.dot + 1..]
    }

    pub fn is_command(&self) -> bool {
        self.category_str().ends_with(COMMAND_SUFFIX)
    }

    /// True for a stream of an outbox (`email:outbox.<id>`), which only the host writes.
    pub fn is_outbox(&self) -> bool {
        self.category_str().ends_with(OUTBOX_SUFFIX)
    }

    /// The service the stream belongs to.
    pub fn service(&self) -> &str {
        service_part(self.category_str())
    }

    /// For a command stream `<service>:command.<id>`, the entity stream `<service>.<id>` it targets.
    pub fn entity_stream(&self) -> StreamName {
        let service = self.service();
        Self {
            full: format!("{service}.{}", self.id()),
            dot: service.len(),
        }
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl TryFrom<String> for StreamName {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<StreamName> for String {
    fn from(value: StreamName) -> Self {
        value.full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_event_and_command_streams() {
        let s = StreamName::parse("email.0082b815-bfe6").expect("valid");
        assert_eq!(s.category().as_str(), "email");
        assert_eq!(s.id(), "0082b815-bfe6");
        assert!(!s.is_command());
        let c = StreamName::parse("email:command.42").expect("valid");
        assert_eq!(c.category().as_str(), "email:command");
        assert_eq!(c.service(), "email");
        assert!(c.is_command());
        assert_eq!(c.entity_stream().as_str(), "email.42");
        assert_eq!(c.entity_stream().category().as_str(), "email");
    }

    #[test]
    fn rejects_malformed_names() {
        for bad in [
            "",
            "email",
            "email.",
            ".42",
            "1email.42",
            "em ail.42",
            "email.4 2",
            "email.a.b",
            "email.*",
            "email.>",
            "email:query.1",
            "email:command:command.1",
            "émail.1",
        ] {
            assert!(StreamName::parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(Category::parse("email:command").is_ok());
        let outbox = Category::parse("email:outbox").expect("an outbox");
        assert!(outbox.is_outbox() && !outbox.is_command());
        assert_eq!(outbox.service(), "email");
        assert!(StreamName::parse("email:outbox:command.1").is_err());
        assert!(Category::parse("email.x").is_err());
    }
}
