//! The guards every request passes before its handler: an open gateway answers only its own
//! machine (`Host`, `Origin`), a client that keeps failing to authenticate is held off, and a
//! request without a credential carries a small body only.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, Request as HttpRequest, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};

use super::limits::SlowDown;
use super::{ApiError, Shared};

/// An open gateway (no access configuration) is for the developer's own machine: it answers
/// only a request whose `Host` is a loopback name or address (or a name the operator allowed)
/// and whose `Origin`, when a browser sends one, is such a host too. Without that, any web page
/// reaches it: through DNS rebinding (a name of the attacker's that now points at 127.0.0.1) or
/// by opening its WebSocket from the page's own origin.
pub(super) async fn same_machine(
    State(gateway): Shared,
    request: HttpRequest,
    next: Next,
) -> Response {
    if gateway.access().is_configured() {
        return next.run(request).await;
    }
    let allowed = |host: &str| {
        local_host(host)
            || gateway
                .config
                .allowed_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(host))
    };
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .map(|value| value.to_str().map(host_of).unwrap_or_default());
    if let Some(host) = host
        && !allowed(&host)
    {
        return ApiError(
            StatusCode::MISDIRECTED_REQUEST,
            "an open gateway answers only a loopback Host (or one given with --http-allowed-host)"
                .into(),
        )
        .into_response();
    }
    let origin = headers.get(header::ORIGIN).map(|value| {
        value
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://").map(|(_, rest)| host_of(rest)))
            .unwrap_or_default()
    });
    if let Some(origin) = origin
        && !allowed(&origin)
    {
        return ApiError(
            StatusCode::FORBIDDEN,
            "an open gateway answers only pages of its own machine (Origin)".into(),
        )
        .into_response();
    }
    next.run(request).await
}

/// Failed authentications count as the client's writes: one that keeps guessing tokens is
/// answered 429, without its credential being looked at, until it has waited.
pub(super) async fn guessing(State(gateway): Shared, request: HttpRequest, next: Next) -> Response {
    let client = client_address(request.extensions());
    if let Some(wait) = gateway.limiter.blocked(client) {
        return ApiError::from(SlowDown(wait)).into_response();
    }
    let presented = request.headers().contains_key(header::AUTHORIZATION)
        || request.uri().query().is_some_and(|q| q.contains("token="));
    let response = next.run(request).await;
    if presented && response.status() == StatusCode::UNAUTHORIZED {
        gateway.limiter.failed_authentication(client);
    }
    response
}

/// A request without a credential may carry a small body only (a registration, a webhook
/// call): anonymous writes are kept for ever.
pub(super) async fn anonymous_body(
    State(gateway): Shared,
    request: HttpRequest,
    next: Next,
) -> Response {
    if request.method() != Method::POST
        || request.headers().contains_key(header::AUTHORIZATION)
        || !gateway.access().is_configured()
    {
        return next.run(request).await;
    }
    let limit = gateway.config.limits.anonymous_body_bytes;
    let (parts, body) = request.into_parts();
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => next.run(HttpRequest::from_parts(parts, bytes.into())).await,
        Err(_) => ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a request without a credential may carry at most {limit} bytes"),
        )
        .into_response(),
    }
}

/// The address a request came from (unspecified when served without connect info, as
/// in-process tests do).
pub(super) fn client_address(extensions: &axum::http::Extensions) -> IpAddr {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
}

/// The host of a `Host` header or an origin's authority, without the port or brackets.
fn host_of(authority: &str) -> String {
    let authority = authority.trim().trim_end_matches('/');
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host),
    };
    host.to_ascii_lowercase()
}

/// `localhost`, a name under `.localhost`, or a loopback address.
fn local_host(host: &str) -> bool {
    host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}
