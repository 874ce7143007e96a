//! `ferry run`'s gateway flags, turned into a [`GatewayConfig`]: the address, who may do what,
//! the page and the limits.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::gateway::{self, Access, GatewayConfig, LimitSettings, Policy, TokenVerifier};

/// The HTTP gateway's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    /// Serve the HTTP gateway (commands, reads, WebSocket notifications) on this address, such
    /// as 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// The operator's bearer token: may do everything over HTTP.
    #[arg(long, env = "FERRY_HTTP_TOKEN", requires = "http")]
    pub http_token: Option<String>,
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
    /// Verify end users' tokens (EdDSA or RS256) with the PEM public key in this file.
    #[arg(long, value_name = "FILE", requires = "http_policy")]
    pub http_jwt_public_key: Option<PathBuf>,
    /// Serve with no access configuration on an address other machines can reach (everything
    /// open to everyone).
    #[arg(long, requires = "http")]
    pub http_insecure: bool,
    /// An HTML file the gateway serves at `/` (such as examples/web/index.html).
    #[arg(long, value_name = "FILE", requires = "http")]
    pub page: Option<PathBuf>,
    /// Writes per second one client address may make (end users and anonymous clients).
    #[arg(long, value_name = "N", default_value_t = LimitSettings::default().writes_per_second)]
    pub http_write_rate: u32,
    /// Writes a client may make at once before the rate applies.
    #[arg(long, value_name = "N", default_value_t = LimitSettings::default().write_burst)]
    pub http_write_burst: u32,
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
        if let Some(token) = &self.http_token {
            anyhow::ensure!(!token.trim().is_empty(), "the operator token is empty");
            access = access.with_operator(token);
        }
        if let Some(path) = &self.http_policy {
            access = access.with_policy(Policy::load(path)?);
        }
        if self.http_jwt_secret_file.is_some() || self.http_jwt_public_key.is_some() {
            let verifier = TokenVerifier::from_files(
                self.http_jwt_secret_file.as_deref(),
                self.http_jwt_public_key.as_deref(),
            )?;
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
            ..LimitSettings::default()
        };
        Ok(Some((
            address,
            GatewayConfig {
                access,
                page,
                limits,
            },
        )))
    }
}
