//! The users aggregator of the article: it follows the `user` category and keeps view data, each
//! row stamped by the host with the global position that changed it last (`lastUpdateSeq`), so a
//! replayed event never changes a row twice.
//!
//! - `users`: user id → `{ userId, username, email, firstName, lastName }`
//! - `users-by-username`: lower-cased username → `{ userId }`
//! - `users-by-email`: lower-cased email → `{ userId }`

use ferry_sdk::{Manifest, Message, Outcome, Result, Service, host, json};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UserRow {
    user_id: String,
    username: String,
    email: String,
    first_name: String,
    last_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NameChanged {
    user_id: String,
    first_name: String,
    last_name: String,
}

struct UserAggregator;

impl Service for UserAggregator {
    type State = ();

    fn manifest() -> Manifest {
        Manifest::new("user-aggregator")
            .subscribe("user")
            .view("users")
            .view("users-by-username")
            .view("users-by-email")
    }

    fn handle_event(event: &Message, _state: Option<()>) -> Result<Outcome> {
        match event.message_type.as_str() {
            "UserRegistered" => {
                let row: UserRow = event.data()?;
                Ok(Outcome::none()
                    .upsert(
                        "users-by-username",
                        &row.username.to_lowercase(),
                        &json!({ "userId": row.user_id }),
                    )
                    .upsert(
                        "users-by-email",
                        &row.email.to_lowercase(),
                        &json!({ "userId": row.user_id }),
                    )
                    .upsert("users", &row.user_id.clone(), &row))
            }
            "NameChanged" => {
                let change: NameChanged = event.data()?;
                let Some(mut row) = host::view::<UserRow>("users", &change.user_id)? else {
                    return Ok(Outcome::none());
                };
                row.first_name = change.first_name;
                row.last_name = change.last_name;
                Ok(Outcome::none().upsert("users", &change.user_id, &row))
            }
            _ => Ok(Outcome::none()),
        }
    }
}

ferry_sdk::service!(UserAggregator);
