//! `ferry run`'s gateway flags, turned into a [`GatewayConfig`]: the address, who may do what,
//! the page and the limits.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::gateway::{self, Access, GatewayConfig, LimitSettings, Policy, TokenVerifier};

/// The shortest operator token taken: it may do everything.
const MIN_OPERATOR_TOKEN_BYTES: usize = 32;

/// The HTTP gateway's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    /// Serve the HTTP gateway (commands, reads, WebSocket notifications) on this address, such
    /// as 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// The operator's bearer token: may do everything over HTTP. At least 32 bytes; prefer
    /// --http-token-file or the environment (a command line is visible to every local user).
    #[arg(
        long,
        env = "FERRY_HTTP_TOKEN",
        requires = "http",
        conflicts_with = "http_token_file"
    )]
    pub http_token: Option<String>,
    /// A file holding the operator's bearer token (readable by its owner only).
    #[arg(long, value_name = "FILE", requires = "http")]
    pub http_token_file: Option<PathBuf>,
    /// What end users (with a signed token) and anonymous clients may do: a TOML policy file
    /// (see examples/web/policy.toml).
    #[arg(long, value_name = "FILE", requires = "http")]
    pub http_policy: Option<PathBuf>,
    /// Verify end users' tokens (HS256) with the shared secret in this file.
    #[arg(
        long,
        value_name = "FILE",
        requires = "http_policy",
        conflicts_with = "http_jwt_public_key"
    )]
    pub http_jwt_secret_file: Option<PathBuf>,
    /// Verify end users' tokens (EdDSA or RS256) with the PEM public key in this file; needs
    /// --http-jwt-issuer and --http-jwt-audience, so that a token the identity provider signed
    /// for another application is not taken.
    #[arg(
        long,
        value_name = "FILE",
        requires_all = ["http_policy", "http_jwt_issuer", "http_jwt_audience"]
    )]
    pub http_jwt_public_key: Option<PathBuf>,
    /// The issuer (`iss`) end users' tokens must name.
    #[arg(long, value_name = "ISSUER", requires = "http_policy")]
    pub http_jwt_issuer: Option<String>,
    /// The audience (`aud`) end users' tokens must name: this deployment of Ferry.
    #[arg(long, value_name = "AUDIENCE", requires = "http_policy")]
    pub http_jwt_audience: Option<String>,
    /// Serve with no access configuration on an address other machines can reach (everything
    /// open to everyone).
    #[arg(long, requires = "http")]
    pub http_insecure: bool,
    /// An HTML file the gateway serves at `/` (such as examples/web/index.html).
    #[arg(long, value_name = "FILE", requires = "http")]
    pub page: Option<PathBuf>,
    /// A host name an open gateway answers besides loopback ones (repeatable): without access
    /// configuration it refuses any other `Host`, and any other page's `Origin`, so that a web
    /// page cannot reach it through DNS rebinding or open its WebSocket.
    #[arg(long, value_name = "NAME", requires = "http")]
    pub http_allowed_host: Vec<String>,
    /// Writes per second one client address may make (end users and anonymous clients).
    #[arg(long, value_name = "N", default_value_t = LimitSettings::default().writes_per_second)]
    pub http_write_rate: u32,
    /// Writes a client may make at once before the rate applies.
    #[arg(long, value_name = "N", default_value_t = LimitSettings::default().write_burst)]
    pub http_write_burst: u32,
    /// Writes per second of all anonymous clients together.
    #[arg(long, value_name = "N", default_value_t = LimitSettings::default().anonymous_writes_per_second)]
    pub http_anonymous_write_rate: u32,
    /// Largest body of a request without a credential, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = LimitSettings::default().anonymous_body_bytes)]
    pub http_anonymous_body_bytes: usize,
    /// Largest WebSocket message a client may send, in bytes (a follow or a token).
    #[arg(long, value_name = "BYTES", default_value_t = LimitSettings::default().websocket_message_bytes)]
    pub http_websocket_message_bytes: usize,
    /// A WebSocket peer silent this long (pings unanswered) is dropped, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = LimitSettings::default().websocket_idle.as_secs(), value_parser = clap::value_parser!(u64).range(3..))]
    pub http_websocket_idle_secs: u64,
    /// How long a WebSocket opened without a credential has to present one, where anonymous
    /// clients may follow nothing, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = LimitSettings::default().websocket_sign_in.as_secs())]
    pub http_websocket_sign_in_secs: u64,
    /// Open WebSocket connections in all.
    #[arg(long, value_name = "N", default_value_t = LimitSettings::default().connections)]
    pub http_max_connections: usize,
}

impl HttpArgs {
    /// The gateway's address and configuration, when it is to run. Refuses an open gateway on
    /// an address other machines can reach, and a policy file that is wrong.
    pub async fn gateway(self) -> anyhow::Result<Option<(String, GatewayConfig)>> {
        let Some(address) = self.http else {
            return Ok(None);
        };
        let mut access = Access::open();
        let token = match (&self.http_token, &self.http_token_file) {
            (Some(token), _) => Some(token.trim().to_owned()),
            (None, Some(path)) => {
                let bytes = crate::files::read_private(path, "operator token file")?;
                Some(
                    String::from_utf8(bytes)
                        .context("the operator token file is not UTF-8")?
                        .trim()
                        .to_owned(),
                )
            }
            (None, None) => None,
        };
        if let Some(token) = &token {
            anyhow::ensure!(
                token.len() >= MIN_OPERATOR_TOKEN_BYTES,
                "the operator token has {} bytes; use at least {MIN_OPERATOR_TOKEN_BYTES} random \
                 ones (for example `head -c 32 /dev/urandom | base64`)",
                token.len()
            );
            access = access.with_operator(token);
        }
        if let Some(path) = &self.http_policy {
            access = access.with_policy(Policy::load(path)?);
        }
        if self.http_jwt_secret_file.is_some() || self.http_jwt_public_key.is_some() {
            let verifier = TokenVerifier::from_files(
                self.http_jwt_secret_file.as_deref(),
                self.http_jwt_public_key.as_deref(),
            )?
            .bound_to(
                self.http_jwt_issuer.as_deref(),
                self.http_jwt_audience.as_deref(),
            );
            access = access.with_verifier(verifier);
        }
        gateway::check_exposure(&address, &access, self.http_insecure).await?;
        let page = self
            .page
            .map(|path| {
                std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read the page {}", path.display()))
            })
            .transpose()?;
        let limits = LimitSettings {
            writes_per_second: self.http_write_rate.max(1),
            write_burst: self.http_write_burst.max(1),
            connections: self.http_max_connections.max(1),
            anonymous_writes_per_second: self.http_anonymous_write_rate.max(1),
            anonymous_body_bytes: self.http_anonymous_body_bytes,
            websocket_message_bytes: self.http_websocket_message_bytes.max(256),
            websocket_idle: std::time::Duration::from_secs(self.http_websocket_idle_secs),
            websocket_sign_in: std::time::Duration::from_secs(self.http_websocket_sign_in_secs),
            ..LimitSettings::default()
        };
        Ok(Some((
            address,
            GatewayConfig {
                access,
                page,
                limits,
                allowed_hosts: self.http_allowed_host,
            },
        )))
    }
}
