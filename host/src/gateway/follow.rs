//! The WebSocket (`/ws`): pushes each new message of the streams a client follows, in stream
//! order (the article's socket notifications: a browser follows
//! `socket-notification:command.<userId>` and gets its `NotifyUser` commands).
//!
//! Browsers cannot set headers on a WebSocket, so the token comes as `?token=` or as a first
//! message `{"token": T}` (also to renew it later); `Authorization: Bearer` works for other
//! clients. Every follow is checked against the caller's rights; when the token expires the
//! connection is closed, so a follow never outlives the right to it.
//!
//! A slot is not held for free: messages are bounded to what the protocol sends (a follow, a
//! token), the server pings a third of the idle time apart and drops a peer it has not heard
//! from for the idle time, and where anonymous clients may follow nothing a connection opened
//! without a credential has a short while to present one.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::json;

use super::access::{Caller, Denied, now_s};
use super::limits::ConnectionPass;
use super::policy::Right;
use super::{ApiError, ClientAddr, Gateway, Shared, bearer};
use crate::seal;
use crate::store::{ConsumerId, StreamName};

/// What a client may put in the WebSocket's address.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Connect {
    token: Option<String>,
}

/// Follow a stream from a position (0 for its start; after a reconnect, one past the last
/// position it got, so it misses nothing).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Follow {
    follow: String,
    #[serde(default)]
    from: u64,
}

/// Present (or renew) the token.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Present {
    token: String,
}

/// WebSocket close code for "the credential is no longer valid" (private range 4000-4999,
/// mirroring HTTP 401).
const CLOSE_UNAUTHORIZED: u16 = 4401;

pub(super) async fn upgrade(
    State(gateway): Shared,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    query: Result<Query<Connect>, axum::extract::rejection::QueryRejection>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let Query(connect) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let token = bearer(&headers)?.or(connect.token);
    let caller = gateway.access().caller(token.as_deref())?;
    let Some(pass) = gateway.limiter.connect(client) else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many WebSocket connections; try again later".into(),
        ));
    };
    let bound = gateway.limiter.settings.websocket_message_bytes;
    Ok(upgrade
        .max_message_size(bound)
        .max_frame_size(bound)
        .on_upgrade(move |socket| serve(gateway, caller, pass, socket))
        .into_response())
}

fn error_text(text: impl std::fmt::Display) -> WsMessage {
    WsMessage::Text(json!({ "error": text.to_string() }).to_string().into())
}

/// How long until the caller's token expires (never for the operator and anonymous).
fn time_left(caller: &Caller) -> Option<Duration> {
    match caller {
        Caller::User { expires_at, .. } => {
            Some(Duration::from_secs(expires_at.saturating_sub(now_s())))
        }
        _ => None,
    }
}

async fn serve(
    gateway: Arc<Gateway>,
    mut caller: Caller,
    _pass: ConnectionPass,
    socket: WebSocket,
) {
    let (mut sender, mut receiver) = socket.split();
    let (push, mut pushed) = tokio::sync::mpsc::channel::<String>(256);
    let mut followers = tokio::task::JoinSet::new();
    let settings = gateway.limiter.settings;
    let most = settings.follows_per_connection;
    let mut heard = tokio::time::Instant::now();
    let mut pings = tokio::time::interval(settings.websocket_idle / 3);
    pings.tick().await;
    // Anonymous where anonymous may follow nothing: a token must come soon.
    let mut sign_in_by = (caller == Caller::Anonymous && !gateway.access().anonymous_may_follow())
        .then(|| tokio::time::Instant::now() + settings.websocket_sign_in);
    loop {
        let sign_in = async {
            match sign_in_by {
                Some(by) => tokio::time::sleep_until(by).await,
                None => std::future::pending().await,
            }
        };
        let expiry = async {
            match time_left(&caller) {
                // A whole second past `exp`: `now_s` counts whole seconds.
                Some(left) => tokio::time::sleep(left + Duration::from_secs(1)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = pings.tick() => {
                if heard.elapsed() >= settings.websocket_idle {
                    tracing::debug!("WebSocket peer silent for {:?}: dropped", settings.websocket_idle);
                    break;
                }
                if sender.send(WsMessage::Ping(Default::default())).await.is_err() {
                    break;
                }
            }
            () = sign_in => {
                let _ = sender.send(error_text("present a token (`{\"token\": TOKEN}`) to follow anything here")).await;
                let _ = close(&mut sender, Denied::Unauthenticated).await;
                break;
            }
            incoming = receiver.next() => {
                // Anything from the peer (a pong too) shows it is there; an error (a message
                // past the bound, among others) ends the connection.
                let Some(Ok(message)) = incoming else { break };
                heard = tokio::time::Instant::now();
                let WsMessage::Text(text) = message else { continue };
                if let Ok(present) = serde_json::from_str::<Present>(&text) {
                    match gateway.access().caller(Some(&present.token)) {
                        Ok(renewed @ Caller::User { .. })
                            if matches!(&caller, Caller::User { .. })
                                && renewed_subject(&renewed) != renewed_subject(&caller) =>
                        {
                            let _ = sender.send(error_text("a connection keeps one subject; connect again for another")).await;
                            break;
                        }
                        Ok(renewed) => {
                            if renewed != Caller::Anonymous {
                                sign_in_by = None;
                            }
                            caller = renewed;
                        }
                        Err(denied) => {
                            let _ = sender.send(error_text(denied)).await;
                            let _ = close(&mut sender, denied).await;
                            break;
                        }
                    }
                    continue;
                }
                let follow = match serde_json::from_str::<Follow>(&text) {
                    Ok(follow) => follow,
                    Err(e) => {
                        let text = format!("expected {{\"follow\": STREAM, \"from\": N}} or {{\"token\": TOKEN}}: {e}");
                        if sender.send(error_text(text)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                };
                let answer = match gateway.access().check(&caller, Right::Follow(&follow.follow)) {
                    Err(denied) => Some(json!({ "error": denied.to_string(), "follow": follow.follow })),
                    Ok(()) if followers.len() >= most => Some(json!({
                        "error": format!("a connection follows at most {most} streams"),
                        "follow": follow.follow,
                    })),
                    Ok(()) => match StreamName::parse(&follow.follow) {
                        Ok(stream) => {
                            followers.spawn(follow_stream(gateway.clone(), stream, follow.from, push.clone()));
                            None
                        }
                        Err(e) => Some(json!({ "error": e.to_string(), "follow": follow.follow })),
                    },
                };
                if let Some(answer) = answer
                    && sender.send(WsMessage::Text(answer.to_string().into())).await.is_err()
                {
                    break;
                }
            }
            Some(text) = pushed.recv() => {
                if sender.send(WsMessage::Text(text.into())).await.is_err() {
                    break;
                }
            }
            () = expiry => {
                let _ = sender.send(error_text(Denied::Expired)).await;
                let _ = close(&mut sender, Denied::Expired).await;
                break;
            }
        }
    }
    followers.abort_all();
}

fn renewed_subject(caller: &Caller) -> Option<&str> {
    match caller {
        Caller::User { subject, .. } => Some(subject),
        _ => None,
    }
}

async fn close(
    sender: &mut futures_util::stream::SplitSink<WebSocket, WsMessage>,
    denied: Denied,
) -> Result<(), axum::Error> {
    sender
        .send(WsMessage::Close(Some(CloseFrame {
            code: CLOSE_UNAUTHORIZED,
            reason: denied.to_string().into(),
        })))
        .await
}

async fn follow_stream(
    gateway: Arc<Gateway>,
    stream: StreamName,
    mut from: u64,
    push: tokio::sync::mpsc::Sender<String>,
) {
    let store = &gateway.context.store;
    let watcher = ConsumerId::new(stream.category(), "gateway");
    loop {
        let Ok(mut changes) = store.watch(&watcher).await else {
            return;
        };
        let messages = match store.read_stream(&stream, from, 100).await {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(%stream, "gateway follower: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let caught_up = messages.is_empty();
        for mut message in messages {
            from = message.position + 1;
            seal::redact(&mut message);
            let text = json!({ "stream": stream, "message": message }).to_string();
            if push.send(text).await.is_err() {
                return;
            }
        }
        if caught_up && changes.changed().await.is_err() {
            return;
        }
    }
}
