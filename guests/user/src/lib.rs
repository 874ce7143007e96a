//! The user service of the article. It owns `user` and `user:command`.
//!
//! - `RegisterUser { username, email, password, firstName, lastName }` on `user:command.<userId>`
//!   → `UserRegistered` on `user.<userId>`, or `UserRegistrationRejected` when the username or the
//!   email is taken. Taken is checked twice, as the article insists: against the users view (fast,
//!   maybe stale) and against claim streams `user.username-<hash>` / `user.email-<hash>` that this
//!   service writes in the same commit as the registration (consistent, because one consumer
//!   handles `user:command` in order). A retried registration is a no-op. The password is stored
//!   only as a salted PBKDF2-SHA256 hash.
//! - `ChangeName { firstName, lastName }` → `NameChanged`.
//! - It follows its own events: on `UserRegistered` it sends the welcome `SendEmail` (with a
//!   confirm-your-email link, `originEntity: user.<id>`); on `NameChanged` it sends `NotifyUser`
//!   to `socket-notification:command.<userId>`.

use ferry_sdk::{Manifest, Message, Outcome, Result, Service, host, json, permanent, write};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const PBKDF2_ROUNDS: u32 = 20_000;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisterUser {
    username: String,
    email: String,
    password: String,
    first_name: String,
    last_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChangeName {
    first_name: String,
    last_name: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UserState {
    registered: bool,
    rejected: bool,
    username: String,
    email: String,
    first_name: String,
    last_name: String,
    /// For a claim stream: the user holding the claim.
    claimed_by: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ViewOwner {
    user_id: String,
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let inner: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
    let outer: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
    let inner_hash = Sha256::new()
        .chain_update(&inner)
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(&outer)
        .chain_update(inner_hash)
        .finalize()
        .into()
}

/// PBKDF2-HMAC-SHA256, one block: enough for a 32-byte key.
fn password_hash(password: &str, salt: &str) -> String {
    let mut u = hmac_sha256(
        password.as_bytes(),
        &[salt.as_bytes(), &1u32.to_be_bytes()].concat(),
    );
    let mut key = u;
    for _ in 1..PBKDF2_ROUNDS {
        u = hmac_sha256(password.as_bytes(), &u);
        key.iter_mut().zip(u).for_each(|(k, b)| *k ^= b);
    }
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    format!("pbkdf2-sha256${PBKDF2_ROUNDS}${salt}${hex}")
}

/// The claim stream of a username or an email: `user.username-<sha256 of the lower-cased value>`.
fn claim_stream(kind: &str, value: &str) -> String {
    format!(
        "user.{kind}-{}",
        &sha256_hex(&[value.to_lowercase().as_bytes()])[..40]
    )
}

/// Who holds a username or email, checking the view first and the claim stream second.
fn holder(kind: &str, table: &str, value: &str) -> Result<Option<String>> {
    if let Some(owner) = host::view::<ViewOwner>(table, &value.to_lowercase())? {
        return Ok(Some(owner.user_id));
    }
    let claims = host::read_stream(&claim_stream(kind, value))?;
    let mut state = UserState::default();
    for claim in &claims {
        state = UserService::project(state, claim)?;
    }
    Ok(state.claimed_by)
}

struct UserService;

impl Service for UserService {
    type State = UserState;

    fn manifest() -> Manifest {
        Manifest::new("user").handles_commands().subscribe("user")
    }

    fn project(mut state: UserState, event: &Message) -> Result<UserState> {
        let text = |key: &str| event.data[key].as_str().unwrap_or_default().to_owned();
        match event.message_type.as_str() {
            "UserRegistered" => {
                state.registered = true;
                state.username = text("username");
                state.email = text("email");
                state.first_name = text("firstName");
                state.last_name = text("lastName");
            }
            "UserRegistrationRejected" => state.rejected = true,
            "NameChanged" => {
                state.first_name = text("firstName");
                state.last_name = text("lastName");
            }
            "UsernameClaimed" | "EmailClaimed" => {
                state.claimed_by.get_or_insert_with(|| text("userId"));
            }
            _ => {}
        }
        Ok(state)
    }

    fn handle_command(command: &Message, state: Option<UserState>) -> Result<Outcome> {
        let state = state.unwrap_or_default();
        let user_id = command.entity_id().to_owned();
        let stream = format!("user.{user_id}");
        match command.message_type.as_str() {
            "RegisterUser" => {
                if state.registered || state.rejected {
                    // A retried command: the decision was made and written already.
                    return Ok(Outcome::none());
                }
                let register: RegisterUser = command.data()?;
                if register.username.trim().is_empty() || !register.email.contains('@') {
                    return Err(permanent(
                        "RegisterUser needs a username and an email address",
                    ));
                }
                let taken = [
                    ("username", "users-by-username", register.username.as_str()),
                    ("email", "users-by-email", register.email.as_str()),
                ]
                .into_iter()
                .find_map(|(kind, table, value)| match holder(kind, table, value) {
                    Ok(Some(owner)) if owner != user_id => Some(Ok(kind)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .transpose()?;
                if let Some(kind) = taken {
                    return Ok(Outcome::none().with(write(
                        stream,
                        "UserRegistrationRejected",
                        &json!({
                            "userId": user_id,
                            "username": register.username,
                            "email": register.email,
                            "reason": format!("{kind} is taken"),
                        }),
                    )));
                }
                let salt = &host::new_id("password-salt")[..16];
                Ok(Outcome::none()
                    .with(write(
                        stream,
                        "UserRegistered",
                        &json!({
                            "userId": user_id,
                            "username": register.username,
                            "email": register.email,
                            "firstName": register.first_name,
                            "lastName": register.last_name,
                            "passwordHash": password_hash(&register.password, salt),
                        }),
                    ))
                    .with(write(
                        claim_stream("username", &register.username),
                        "UsernameClaimed",
                        &json!({ "userId": user_id, "username": register.username }),
                    ))
                    .with(write(
                        claim_stream("email", &register.email),
                        "EmailClaimed",
                        &json!({ "userId": user_id, "email": register.email }),
                    )))
            }
            "ChangeName" => {
                if !state.registered {
                    return Err(permanent(format!("user {user_id} is not registered")));
                }
                let change: ChangeName = command.data()?;
                if change.first_name == state.first_name && change.last_name == state.last_name {
                    return Ok(Outcome::none());
                }
                Ok(Outcome::none().with(write(
                    stream,
                    "NameChanged",
                    &json!({
                        "userId": user_id,
                        "firstName": change.first_name,
                        "lastName": change.last_name,
                    }),
                )))
            }
            other => Err(permanent(format!("unknown command {other}"))),
        }
    }

    fn handle_event(event: &Message, _state: Option<UserState>) -> Result<Outcome> {
        let user_id = event.entity_id();
        match event.message_type.as_str() {
            "UserRegistered" => {
                let email_id = host::new_id("welcome-email");
                let to = event.data["email"].as_str().unwrap_or_default();
                let first_name = event.data["firstName"].as_str().unwrap_or_default();
                let body = format!(
                    "Hello {first_name},\n\nwelcome! Please confirm that this address is yours:\n\
                     http://localhost:8080/confirm-email?user={user_id}&token={}\n",
                    &host::secret("confirm-token")?[..32]
                );
                Ok(Outcome::none().with(
                    write(
                        format!("email:command.{email_id}"),
                        "SendEmail",
                        &json!({
                            "id": email_id,
                            "from": "welcome@ferry.local",
                            "to": to,
                            "subject": "Welcome! Please confirm your email",
                            "body": body,
                        }),
                    )
                    .metadata(json!({ "originEntity": format!("user.{user_id}") })),
                ))
            }
            "NameChanged" => Ok(Outcome::none().with(write(
                format!("socket-notification:command.{user_id}"),
                "NotifyUser",
                &json!({
                    "userId": user_id,
                    "eventType": "NameChanged",
                    "eventId": event.id,
                    "firstName": event.data["firstName"],
                    "lastName": event.data["lastName"],
                }),
            ))),
            _ => Ok(Outcome::none()),
        }
    }
}

ferry_sdk::service!(UserService);
