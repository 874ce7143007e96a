//! The `counter-commands` guest's logic compiled into the benchmark (row 2's native variant).

use super::*;

/// The `counter-commands` guest's logic compiled into the benchmark: the same contract, the same
/// JSON in and out, no sandbox.
pub(super) struct NativeCounter;

/// The projected state, read typed as the guest reads it.
#[derive(serde::Deserialize, serde::Serialize)]
pub(super) struct Total {
    #[serde(default)]
    pub(super) total: i64,
}

pub(super) fn total(state: Option<&str>) -> Result<i64, GuestError> {
    Ok(match state {
        Some(text) => {
            serde_json::from_str::<Total>(text)
                .map_err(|e| GuestError::Permanent(format!("bad JSON: {e}")))?
                .total
        }
        None => 0,
    })
}

#[derive(serde::Serialize)]
pub(super) struct IncrementedData {
    pub(super) by: i64,
    pub(super) total: i64,
}

pub(super) fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

impl NativeService for NativeCounter {
    fn manifest(&self) -> Manifest {
        Manifest {
            name: "counter".into(),
            handles_commands: true,
            subscriptions: Vec::new(),
            views: Vec::new(),
        }
    }

    fn project(
        &self,
        _: &mut dyn GuestHost,
        state: Option<&str>,
        event: &Message,
    ) -> Result<String, GuestError> {
        let by = match event.message_type.as_str() {
            "Incremented" => event.data["by"].as_i64().unwrap_or(0),
            _ => 0,
        };
        Ok(to_json(&Total {
            total: total(state)? + by,
        }))
    }

    fn handle_command(
        &self,
        _: &mut dyn GuestHost,
        command: &Message,
        state: Option<&str>,
    ) -> Result<Outcome, GuestError> {
        let by = command.data["by"]
            .as_i64()
            .ok_or_else(|| GuestError::Permanent("Increment needs an integer `by`".into()))?;
        Ok(Outcome {
            messages: vec![Outgoing {
                stream: format!("counter.{}", command.stream.id()),
                message_type: "Incremented".into(),
                data: to_json(&IncrementedData {
                    by,
                    total: total(state)? + by,
                }),
                metadata: Some(r#"{"handledBy":"counter"}"#.into()),
                not_before_ms: None,
            }],
            views: Vec::new(),
        })
    }

    fn handle_event(
        &self,
        _: &mut dyn GuestHost,
        _: &Message,
        _: Option<&str>,
    ) -> Result<Outcome, GuestError> {
        Ok(Outcome::default())
    }
}
