//! The access policy (`ferry run --http-policy FILE`): what end users and anonymous clients may
//! do over HTTP, as TOML. The operator token is not in it: it may do everything.
//!
//! ```toml
//! [anonymous]                   # needs no token
//! send = [{ stream = "user:command.*", types = ["RegisterUser"] }]
//! exists = ["users-by-username/*"]
//!
//! [user]                        # any valid token; {sub} is its subject
//! send = [{ stream = "user:command.{sub}", types = ["ChangeName"] }]
//! follow = ["socket-notification:command.{sub}", "user.{sub}"]
//! view = ["users/{sub}"]
//! ```
//!
//! Rights: `send` (to streams matching a pattern, only the listed message types), `read` (a
//! stream, or a category by its bare name), `follow` (a stream over the WebSocket), `view` (a
//! view row `table/key`, or a whole table by its bare name) and `exists` (whether a view row
//! exists, and nothing else). In a pattern `*` stands for one or more characters of any kind and
//! `{sub}` for the token's subject, matched literally. A user may also do what anonymous may.
//! Nothing else is allowed: a right not listed is denied.

use serde::Deserialize;
use toml::Spanned;

/// One thing a caller asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right<'a> {
    Send {
        stream: &'a str,
        message_type: &'a str,
    },
    Read(&'a str),
    Follow(&'a str),
    View(&'a str),
    Exists(&'a str),
    /// Consumers, parked messages, replay, metrics: the operator's alone.
    Operate,
}

/// A policy file that cannot be used; the text names the line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(String);

/// A parsed policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    anonymous: Rules,
    user: Rules,
}

#[derive(Debug, Clone, Default)]
struct Rules {
    send: Vec<(Pattern, Vec<String>)>,
    read: Vec<Pattern>,
    follow: Vec<Pattern>,
    view: Vec<Pattern>,
    exists: Vec<Pattern>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    anonymous: RulesFile,
    #[serde(default)]
    user: RulesFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    send: Vec<SendFile>,
    #[serde(default)]
    read: Vec<Spanned<String>>,
    #[serde(default)]
    follow: Vec<Spanned<String>>,
    #[serde(default)]
    view: Vec<Spanned<String>>,
    #[serde(default)]
    exists: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendFile {
    stream: Spanned<String>,
    types: Spanned<Vec<String>>,
}

/// A pattern's parts, `{sub}` kept apart so that it is substituted literally.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Any,
    Subject,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern(Vec<Part>);

impl Policy {
    /// Parses a policy file's text; an error names the line that is wrong.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| {
            // toml's message starts with "TOML parse error at line N, column M".
            PolicyError(e.to_string().trim_end().to_owned())
        })?;
        Ok(Self {
            anonymous: Rules::of(file.anonymous, text, false)?,
            user: Rules::of(file.user, text, true)?,
        })
    }

    /// Reads and parses a policy file.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the policy file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("the policy file {} is wrong", path.display()))
    }

    /// Whether anonymous clients may follow anything.
    pub fn anonymous_follows(&self) -> bool {
        !self.anonymous.follow.is_empty()
    }

    /// Whether an anonymous client (`subject` None) or the user `subject` may do this.
    pub fn allows(&self, subject: Option<&str>, right: Right<'_>) -> bool {
        if self.anonymous.allows(None, right) {
            return true;
        }
        match subject {
            Some(subject) => self.user.allows(Some(subject), right),
            None => false,
        }
    }
}

impl Rules {
    fn of(file: RulesFile, text: &str, has_subject: bool) -> Result<Self, PolicyError> {
        let patterns = |list: Vec<Spanned<String>>| -> Result<Vec<Pattern>, PolicyError> {
            list.into_iter()
                .map(|p| Pattern::parse(&p, text, has_subject))
                .collect()
        };
        let mut send = Vec::new();
        for rule in file.send {
            let types = rule.types.get_ref();
            if types.is_empty() || types.iter().any(|t| t.trim().is_empty()) {
                return Err(PolicyError(format!(
                    "line {}: `types` lists the message types allowed; it must name at least one, none empty",
                    line_of(text, rule.types.span().start)
                )));
            }
            let types = rule.types.into_inner();
            send.push((Pattern::parse(&rule.stream, text, has_subject)?, types));
        }
        Ok(Self {
            send,
            read: patterns(file.read)?,
            follow: patterns(file.follow)?,
            view: patterns(file.view)?,
            exists: patterns(file.exists)?,
        })
    }

    fn allows(&self, subject: Option<&str>, right: Right<'_>) -> bool {
        let any = |patterns: &[Pattern], target: &str| {
            patterns.iter().any(|p| p.matches(target, subject))
        };
        match right {
            Right::Send {
                stream,
                message_type,
            } => self.send.iter().any(|(pattern, types)| {
                pattern.matches(stream, subject) && types.iter().any(|t| t == message_type)
            }),
            Right::Read(target) => any(&self.read, target),
            Right::Follow(stream) => any(&self.follow, stream),
            Right::View(target) => any(&self.view, target),
            Right::Exists(target) => any(&self.exists, target),
            Right::Operate => false,
        }
    }

    /// Whether some send rule might allow this before the request's body is read: one that
    /// matches the stream (any type), or that lists the type (any stream).
    fn may_send(&self, before_body: BeforeBody<'_>, subject: Option<&str>) -> bool {
        self.send.iter().any(|(pattern, types)| match before_body {
            BeforeBody::Stream(stream) => pattern.matches(stream, subject),
            BeforeBody::Type(message_type) => types.iter().any(|t| t == message_type),
        })
    }
}

/// What is known of a send before its body is read.
#[derive(Debug, Clone, Copy)]
pub enum BeforeBody<'a> {
    Stream(&'a str),
    Type(&'a str),
}

impl Policy {
    /// Whether some send rule might allow the caller this send (see [`Rules::may_send`]).
    pub fn may_send(&self, subject: Option<&str>, before_body: BeforeBody<'_>) -> bool {
        self.anonymous.may_send(before_body, None)
            || subject.is_some_and(|s| self.user.may_send(before_body, Some(s)))
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

impl Pattern {
    fn parse(
        spanned: &Spanned<String>,
        text: &str,
        has_subject: bool,
    ) -> Result<Self, PolicyError> {
        let line = line_of(text, spanned.span().start);
        let source = spanned.get_ref();
        let wrong = |why: &str| PolicyError(format!("line {line}: pattern {source:?} {why}"));
        if source.is_empty() {
            return Err(wrong("is empty"));
        }
        let mut parts = Vec::new();
        let mut rest = source.as_str();
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix("{sub}") {
                if !has_subject {
                    return Err(wrong(
                        "uses {sub}, but an anonymous client has no subject (it belongs under [user])",
                    ));
                }
                parts.push(Part::Subject);
                rest = after;
            } else if let Some(after) = rest.strip_prefix('*') {
                if parts.last() == Some(&Part::Any) {
                    return Err(wrong("has two `*` in a row"));
                }
                parts.push(Part::Any);
                rest = after;
            } else if rest.starts_with(['{', '}']) {
                return Err(wrong("has a brace that is not {sub}"));
            } else {
                let end = rest.find(['*', '{', '}']).unwrap_or(rest.len());
                let (text, after) = rest.split_at(end);
                if text.chars().any(char::is_whitespace) {
                    return Err(wrong("holds white space"));
                }
                parts.push(Part::Text(text.to_owned()));
                rest = after;
            }
        }
        Ok(Self(parts))
    }

    fn matches(&self, target: &str, subject: Option<&str>) -> bool {
        match_parts(&self.0, target, subject)
    }
}

/// Matches parts against a target; `*` takes one or more characters. Patterns are short and have
/// few `*`, so backtracking is cheap (and bounded by the target's length squared at worst).
fn match_parts(parts: &[Part], target: &str, subject: Option<&str>) -> bool {
    match parts.split_first() {
        None => target.is_empty(),
        Some((Part::Text(text), rest)) => target
            .strip_prefix(text.as_str())
            .is_some_and(|after| match_parts(rest, after, subject)),
        Some((Part::Subject, rest)) => match subject {
            Some(subject) if !subject.is_empty() => target
                .strip_prefix(subject)
                .is_some_and(|after| match_parts(rest, after, Some(subject))),
            _ => false,
        },
        Some((Part::Any, rest)) => target
            .char_indices()
            .skip(1)
            .map(|(i, _)| i)
            .chain(std::iter::once(target.len()))
            .filter(|&i| i > 0)
            .any(|i| match_parts(rest, &target[i..], subject)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARTICLE: &str = r#"
[anonymous]
send = [{ stream = "user:command.*", types = ["RegisterUser"] }]
exists = ["users-by-username/*"]

[user]
send = [{ stream = "user:command.{sub}", types = ["ChangeName"] }]
follow = ["socket-notification:command.{sub}", "user.{sub}"]
view = ["users/{sub}"]
"#;

    fn send<'a>(stream: &'a str, message_type: &'a str) -> Right<'a> {
        Right::Send {
            stream,
            message_type,
        }
    }

    #[test]
    fn allows_what_is_listed_and_nothing_else() {
        let policy = Policy::parse(ARTICLE).expect("parses");
        assert!(policy.allows(None, send("user:command.42", "RegisterUser")));
        assert!(!policy.allows(None, send("user:command.42", "ChangeName")));
        assert!(!policy.allows(None, send("email:command.42", "RegisterUser")));
        assert!(policy.allows(None, Right::Exists("users-by-username/ann")));
        assert!(!policy.allows(None, Right::View("users-by-username/ann")));
        assert!(!policy.allows(None, Right::Follow("user.ann")));

        let ann = Some("ann");
        assert!(policy.allows(ann, send("user:command.ann", "ChangeName")));
        assert!(!policy.allows(ann, send("user:command.bob", "ChangeName")));
        assert!(!policy.allows(ann, send("user:command.annie", "ChangeName")));
        assert!(policy.allows(ann, send("user:command.bob", "RegisterUser")));
        assert!(policy.allows(ann, Right::Follow("user.ann")));
        assert!(policy.allows(ann, Right::Follow("socket-notification:command.ann")));
        assert!(!policy.allows(ann, Right::Follow("socket-notification:command.bob")));
        assert!(policy.allows(ann, Right::View("users/ann")));
        assert!(!policy.allows(ann, Right::View("users")));
        assert!(!policy.allows(ann, Right::Read("user.ann")));
        assert!(!policy.allows(ann, Right::Operate));
    }

    #[test]
    fn a_star_takes_at_least_one_character() {
        let policy = Policy::parse("[anonymous]\nread = [\"a.*.c\", \"x*\"]").expect("parses");
        assert!(policy.allows(None, Right::Read("a.b.c")));
        assert!(policy.allows(None, Right::Read("a.b.b.c")));
        assert!(!policy.allows(None, Right::Read("a..c")));
        assert!(policy.allows(None, Right::Read("xé")));
        assert!(!policy.allows(None, Right::Read("x")));
    }

    #[test]
    fn a_wrong_policy_names_its_line() {
        for (text, line) in [
            ("[anonymous]\nsend = [{ stream = \"a.*\" }]", "line 2"),
            ("[anonymous]\n\nfollow = [\"user.{sub}\"]", "line 3"),
            ("[user]\nview = [\"users/{subject}\"]", "line 2"),
            ("[user]\nwrite = [\"x\"]", "line 2"),
            (
                "[user]\nsend = [{ stream = \"x.*\", types = [] }]",
                "line 2",
            ),
            ("[admin]\n", "line 1"),
            ("[user]\nread = [\"a**\"]", "line 2"),
        ] {
            let error = Policy::parse(text).expect_err(text).to_string();
            assert!(error.contains(line), "{text:?}: {error}");
        }
    }
}
