//! Who is calling and what they may do: the operator token, end users' signed tokens (JWT,
//! verified with `jsonwebtoken`), anonymous clients, and the [`Policy`] that says what the last
//! two may do. Also issues tokens for tests and demos (`ferry token`).
//!
//! With no access configuration at all the gateway is open (a developer's loopback host); with
//! any, everything but `/health` and the page needs a credential that allows it.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::policy::{BeforeBody, Policy, Right};

/// Clock skew allowed between the token's issuer and this host when checking `exp` and `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator token: may do everything.
    Operator,
    /// An end user with a verified token.
    User {
        subject: String,
        /// When the token stops being accepted (its `exp` plus the leeway), in seconds since the
        /// epoch.
        expires_at: u64,
    },
    /// No credential.
    Anonymous,
}

impl Caller {
    fn subject(&self) -> Option<&str> {
        match self {
            Self::User { subject, .. } => Some(subject),
            _ => None,
        }
    }
}

/// Why a request was refused. The texts say what to present, never what exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No credential, or one that is not valid (401).
    #[error("this needs a valid credential: Authorization: Bearer TOKEN")]
    Unauthenticated,
    /// The token is valid and has expired (401).
    #[error("the token has expired")]
    Expired,
    /// A valid credential without the right (403).
    #[error("not allowed")]
    Forbidden,
}

/// The claims Ferry reads from an end user's token.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// Verifies end users' tokens: one key, one algorithm (a token naming another is refused, so
/// an HS256 token cannot pass as signed by an RS256 public key).
#[derive(Clone)]
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("algorithms", &self.validation.algorithms)
            .field("leeway_s", &self.validation.leeway)
            .finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8]) -> anyhow::Result<Self> {
        if secret.len() < 32 {
            anyhow::bail!(
                "the shared secret has {} bytes; use at least 32 random bytes",
                secret.len()
            );
        }
        let key = DecodingKey::from_secret(secret).context("unusable secret")?;
        Ok(Self::new(key, Algorithm::HS256))
    }

    /// EdDSA (Ed25519) or RS256 with a PEM public key, whichever the file holds.
    pub fn public_key(pem: &[u8]) -> anyhow::Result<Self> {
        if let Ok(key) = DecodingKey::from_ed_pem(pem) {
            return Ok(Self::new(key, Algorithm::EdDSA));
        }
        let key = DecodingKey::from_rsa_pem(pem)
            .context("the public key file holds neither an Ed25519 nor an RSA public key (PEM)")?;
        Ok(Self::new(key, Algorithm::RS256))
    }

    /// The secret file (HS256) or the public key file (EdDSA / RS256).
    pub fn from_files(secret: Option<&Path>, public_key: Option<&Path>) -> anyhow::Result<Self> {
        match (secret, public_key) {
            (Some(path), None) => Self::hs256(&read_secret(path)?),
            (None, Some(path)) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("cannot read the public key {}", path.display()))?;
                Self::public_key(&pem)
                    .with_context(|| format!("cannot use the public key {}", path.display()))
            }
            _ => anyhow::bail!("give either a shared secret file or a public key file"),
        }
    }

    fn new(key: DecodingKey, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.leeway = DEFAULT_LEEWAY.as_secs();
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        // Without --http-jwt-audience no audience is asked for (see `bound_to`).
        validation.validate_aud = false;
        Self { key, validation }
    }

    /// The same verifier, taking only tokens that name this issuer and this audience (each
    /// when given): a token an identity provider signed for another application is refused.
    pub fn bound_to(mut self, issuer: Option<&str>, audience: Option<&str>) -> Self {
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = issuer {
            self.validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        if let Some(audience) = audience {
            self.validation.set_audience(&[audience]);
            self.validation.validate_aud = true;
            required.push("aud");
        }
        self.validation.set_required_spec_claims(&required);
        self
    }

    /// The same verifier with another clock skew allowance.
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.validation.leeway = leeway.as_secs();
        self
    }

    /// The caller a token stands for.
    pub fn verify(&self, token: &str) -> Result<Caller, Denied> {
        match jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation) {
            Ok(data) if !data.claims.sub.is_empty() => Ok(Caller::User {
                subject: data.claims.sub,
                expires_at: data.claims.exp.saturating_add(self.validation.leeway),
            }),
            Ok(_) => Err(Denied::Unauthenticated),
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                Err(Denied::Expired)
            }
            Err(_) => Err(Denied::Unauthenticated),
        }
    }
}

/// Reads a shared secret file; white space at either end is not part of the secret (so that
/// `echo SECRET > FILE` works).
pub fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = crate::files::read_private(path, "secret file")?;
    Ok(bytes.trim_ascii().to_vec())
}

/// Issues an HS256 token for `subject`, valid for `ttl` (for tests and demos: real deployments
/// take tokens from their identity provider).
pub fn issue_token(secret: &[u8], subject: &str, ttl: Duration) -> anyhow::Result<String> {
    anyhow::ensure!(!subject.is_empty(), "the subject is empty");
    TokenVerifier::hs256(secret)?;
    let now = now_s();
    let claims = Claims {
        sub: subject.to_owned(),
        exp: now.saturating_add(ttl.as_secs()),
        iat: Some(now),
    };
    let key = EncodingKey::from_secret(secret).context("unusable secret")?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).context("signing")
}

/// Parses a time to live such as `90s`, `15m`, `1h` or `7d`.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit, such as 1h"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit is one of s, m, h, d")),
    };
    match number.checked_mul(seconds) {
        Some(s) if s > 0 => Ok(Duration::from_secs(s)),
        _ => Err(format!("{text:?}: expected a time above zero")),
    }
}

pub(crate) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The gateway's access configuration.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// SHA-256 of the operator token: compared digest to digest, so the comparison's time says
    /// nothing about the token.
    operator: Option<[u8; 32]>,
    verifier: Option<TokenVerifier>,
    policy: Option<Policy>,
}

impl Access {
    /// No configuration: everything is allowed to everyone (only for a loopback address, or
    /// with `--http-insecure`).
    pub fn open() -> Self {
        Self::default()
    }

    /// Only the operator token.
    pub fn operator(token: &str) -> Self {
        Self::default().with_operator(token)
    }

    pub fn with_operator(mut self, token: &str) -> Self {
        self.operator = Some(Sha256::digest(token.as_bytes()).into());
        self
    }

    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = Some(policy);
        self
    }

    pub fn with_verifier(mut self, verifier: TokenVerifier) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// Whether any access is configured (otherwise everything is open).
    pub fn is_configured(&self) -> bool {
        self.operator.is_some() || self.policy.is_some() || self.verifier.is_some()
    }

    /// Whether a client without a credential may follow anything: an open gateway, or a policy
    /// with an anonymous `follow`.
    pub fn anonymous_may_follow(&self) -> bool {
        match &self.policy {
            Some(policy) => policy.anonymous_follows(),
            None => !self.is_configured(),
        }
    }

    /// The caller a bearer token stands for (`None`: no credential presented).
    pub fn caller(&self, bearer: Option<&str>) -> Result<Caller, Denied> {
        let Some(token) = bearer else {
            return Ok(Caller::Anonymous);
        };
        if let Some(operator) = &self.operator
            && Sha256::digest(token.as_bytes()).as_slice() == operator
        {
            return Ok(Caller::Operator);
        }
        if !self.is_configured() {
            // An open gateway ignores credentials.
            return Ok(Caller::Anonymous);
        }
        match &self.verifier {
            Some(verifier) => verifier.verify(token),
            None => Err(Denied::Unauthenticated),
        }
    }

    /// Whether `caller` may do `right`.
    pub fn check(&self, caller: &Caller, right: Right<'_>) -> Result<(), Denied> {
        self.judge(caller, |policy, subject| policy.allows(subject, right))
    }

    /// Whether `caller` might be allowed this send: checked before the body is read, so that a
    /// caller without any right there learns nothing from the body's errors.
    pub fn check_before_body(&self, caller: &Caller, send: BeforeBody<'_>) -> Result<(), Denied> {
        self.judge(caller, |policy, subject| policy.may_send(subject, send))
    }

    /// The operator and an open gateway may do everything; a user whose token expired since it
    /// was verified (a long WebSocket) nothing; others what `allowed` says of the policy.
    fn judge(
        &self,
        caller: &Caller,
        allowed: impl FnOnce(&Policy, Option<&str>) -> bool,
    ) -> Result<(), Denied> {
        if !self.is_configured() || *caller == Caller::Operator {
            return Ok(());
        }
        if let Caller::User { expires_at, .. } = caller
            && now_s() > *expires_at
        {
            return Err(Denied::Expired);
        }
        let allowed = self
            .policy
            .as_ref()
            .is_some_and(|policy| allowed(policy, caller.subject()));
        match (allowed, caller) {
            (true, _) => Ok(()),
            (false, Caller::Anonymous) => Err(Denied::Unauthenticated),
            (false, _) => Err(Denied::Forbidden),
        }
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn a_token_issued_here_verifies_and_names_its_subject() {
        let token = issue_token(SECRET, "ann", Duration::from_secs(60)).expect("issued");
        let verifier = TokenVerifier::hs256(SECRET).expect("verifier");
        match verifier.verify(&token) {
            Ok(Caller::User { subject, .. }) => assert_eq!(subject, "ann"),
            other => panic!("{other:?}"),
        }
        let other = TokenVerifier::hs256(b"another secret of thirty-two bytes").expect("verifier");
        assert_eq!(other.verify(&token), Err(Denied::Unauthenticated));
    }

    #[test]
    fn the_operator_token_is_not_a_user_token() {
        let access = Access::operator("T");
        assert_eq!(access.caller(Some("T")), Ok(Caller::Operator));
        assert_eq!(access.caller(Some("t")), Err(Denied::Unauthenticated));
        assert_eq!(access.caller(None), Ok(Caller::Anonymous));
        assert_eq!(
            access.check(&Caller::Anonymous, Right::Read("user.1")),
            Err(Denied::Unauthenticated)
        );
    }

    /// A key pair made for this test only (`openssl genpkey -algorithm ed25519`).
    const ED25519_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIP3z6wJLWzmqyDQBZNwVSmiYWWydUOpexkBiIr04g31C
-----END PRIVATE KEY-----
";
    const ED25519_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAzdkfxvOqvF0X0OAWIcqRLxNUNvbjGdqtSvMjEZ5n3t0=
-----END PUBLIC KEY-----
";
    /// The public key of another pair.
    const OTHER_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEApMJPQS/BGSCzM2+viDPtmmAnEDNoZZllatEA7NXkLqA=
-----END PUBLIC KEY-----
";

    fn signed(algorithm: Algorithm, key: &EncodingKey) -> String {
        let claims = Claims {
            sub: "ann".into(),
            exp: now_s() + 60,
            iat: None,
        };
        jsonwebtoken::encode(&Header::new(algorithm), &claims, key).expect("signed")
    }

    #[test]
    fn an_eddsa_token_verifies_with_its_public_key_only() {
        let private = EncodingKey::from_ed_pem(ED25519_PRIVATE.as_bytes()).expect("private key");
        let token = signed(Algorithm::EdDSA, &private);
        let verifier = TokenVerifier::public_key(ED25519_PUBLIC.as_bytes()).expect("verifier");
        assert!(matches!(verifier.verify(&token), Ok(Caller::User { .. })));
        let other = TokenVerifier::public_key(OTHER_PUBLIC.as_bytes()).expect("verifier");
        assert_eq!(other.verify(&token), Err(Denied::Unauthenticated));
    }

    #[test]
    fn a_token_of_another_algorithm_is_refused_even_when_keyed_with_the_public_key() {
        // The classic confusion: HS256 with the public key's text as the shared secret.
        let confused = signed(
            Algorithm::HS256,
            &EncodingKey::from_secret(ED25519_PUBLIC.as_bytes()).expect("key"),
        );
        let verifier = TokenVerifier::public_key(ED25519_PUBLIC.as_bytes()).expect("verifier");
        assert_eq!(verifier.verify(&confused), Err(Denied::Unauthenticated));
        // And an unsigned token (`alg: none`, no signature).
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"ann","exp":{}}}"#, now_s() + 60));
        let unsigned = format!("{header}.{claims}.");
        assert_eq!(verifier.verify(&unsigned), Err(Denied::Unauthenticated));
        let shared = TokenVerifier::hs256(SECRET).expect("verifier");
        assert_eq!(shared.verify(&unsigned), Err(Denied::Unauthenticated));
    }

    #[test]
    fn parses_times_to_live() {
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
