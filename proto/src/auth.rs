//! Credentials on gRPC calls (see SECURITY.md, "Roles"):
//! - the **client token** (`MEDRAY_TOKEN`): every `Client` call; it also signs report links;
//! - the **worker token** (`MEDRAY_WORKER_TOKEN`): only `Worker.Register` and the cluster
//!   node's cookie. By default it is derived from the client token with [`worker_token`]
//!   (one-way: a worker cannot compute the client token from it);
//! - a **worker session**: the random credential `Register` returns, valid for that
//!   registration's calls only.
//!
//! Callers attach a credential with [`BearerToken`]; the head checks it with
//! [`check_bearer`] or [`presented_bearer`]. No credential is ever printed (their `Debug` is
//! redacted).

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::AUTHORIZATION_HEADER;

/// A client interceptor that adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerToken(AsciiMetadataValue);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// A value that must never be printed (the cluster token, a TLS private key): its `Debug`
/// says `<redacted>`, and [`Secret::expose`] is the one way to read it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps `value`.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The value, for the one place that uses it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

/// A secret read from a command-line argument or the environment (clap parses it through
/// this, so that the parsed arguments print it redacted).
impl std::str::FromStr for Secret<String> {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why a token cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidToken(pub &'static str);

impl std::fmt::Display for InvalidToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid cluster token: {}", self.0)
    }
}

impl std::error::Error for InvalidToken {}

/// Checks a token's form: 16 to 256 visible ASCII characters, no spaces.
///
/// # Errors
/// [`InvalidToken`] naming the rule it breaks.
pub fn validate_token(token: &str) -> Result<(), InvalidToken> {
    if token.len() < 16 {
        return Err(InvalidToken("shorter than 16 characters"));
    }
    if token.len() > 256 {
        return Err(InvalidToken("longer than 256 characters"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(InvalidToken(
            "only visible ASCII characters are allowed (no spaces)",
        ));
    }
    Ok(())
}

impl BearerToken {
    /// The interceptor for `token`.
    ///
    /// # Errors
    /// [`InvalidToken`] if the token breaks [`validate_token`].
    pub fn new(token: &str) -> Result<Self, InvalidToken> {
        validate_token(token)?;
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| InvalidToken("not a valid metadata value"))?;
        Ok(Self(value))
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(AUTHORIZATION_HEADER, self.0.clone());
        Ok(request)
    }
}

/// The worker token of the cluster whose client token is `client_token`: the hex
/// HMAC-SHA256 of a fixed label under the client token. Whoever holds the client token
/// (the head, an administrator: `medray worker-token`) can compute it; a worker holding it
/// cannot go back to the client token.
#[must_use]
pub fn worker_token(client_token: &str) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = HmacSha256::new_from_slice(client_token.as_bytes()).expect("any key length");
    mac.update(b"medray worker token v1");
    hex::encode(mac.finalize().into_bytes())
}

/// A new random credential (32 bytes from the operating system, hex): a worker session.
#[must_use]
pub fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The bearer credential a call presents.
///
/// # Errors
/// `Unauthenticated` when the `authorization` header is missing or malformed.
pub fn presented_bearer(metadata: &MetadataMap) -> Result<&str, Status> {
    let Some(value) = metadata.get(AUTHORIZATION_HEADER) else {
        return Err(Status::unauthenticated(
            "missing credential (set --token or MEDRAY_TOKEN; workers MEDRAY_WORKER_TOKEN)",
        ));
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("malformed authorization header"))
}

/// Whether two credentials are equal, in constant time.
#[must_use]
pub fn same_credential(presented: &str, expected: &str) -> bool {
    subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), expected.as_bytes()).into()
}

/// Whether two digests are equal, in constant time.
#[must_use]
pub fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a.as_slice(), b.as_slice()).into()
}

/// Checks the bearer token of a call against `expected`, in constant time.
///
/// # Errors
/// `Unauthenticated` when the token is missing, malformed or wrong; the message never
/// contains either token.
pub fn check_bearer(metadata: &MetadataMap, expected: &str) -> Result<(), Status> {
    if same_credential(presented_bearer(metadata)?, expected) {
        Ok(())
    } else {
        Err(Status::unauthenticated(
            "wrong token (client calls need the client token, MEDRAY_TOKEN)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_and_never_printed() {
        let token = "0123456789abcdef-secret";
        let bearer = BearerToken::new(token).unwrap();
        assert!(!format!("{bearer:?}").contains("secret"));
        let mut req = Request::new(());
        req = bearer.clone().call(req).unwrap();
        check_bearer(req.metadata(), token).unwrap();
        let wrong = check_bearer(req.metadata(), "0123456789abcdef-other").unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(!wrong.message().contains("secret"));
        let missing = check_bearer(&MetadataMap::new(), token).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(BearerToken::new("short").is_err());
        assert!(BearerToken::new("has a space in it, long enough").is_err());
    }

    #[test]
    fn the_worker_token_is_derived_one_way_and_differs_per_cluster() {
        let a = worker_token("0123456789abcdef-cluster-a");
        assert_eq!(a, worker_token("0123456789abcdef-cluster-a"));
        assert_ne!(a, worker_token("0123456789abcdef-cluster-b"));
        assert_eq!(a.len(), 64);
        validate_token(&a).unwrap();
        assert!(!a.contains("cluster"));
        let s1 = random_token();
        assert_ne!(s1, random_token());
        validate_token(&s1).unwrap();
    }
}

/// Signed links to the head's report pages (`/jobs`, `/jobs/<job>/report/`): the pages show
/// patients' images, so they need the client credential, carried as a signature with an
/// expiry that `medray report --link` computes from the cluster token. The head checks it
/// with the same key, then sets a cookie (HttpOnly, SameSite=Strict, scoped to the page's
/// path) so that the page's pictures load.
#[derive(Clone)]
pub struct LinkSigner {
    key: [u8; 32],
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkSigner(<redacted>)")
    }
}

/// What the index page's link is signed for (report links are signed for their job id).
pub const INDEX_SCOPE: &str = "index";

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

impl LinkSigner {
    /// The signer of `token`'s cluster (its key is derived from the token, so a new token
    /// voids every link).
    #[must_use]
    pub fn new(token: &str) -> Self {
        use hmac::{KeyInit, Mac};
        let mut mac = HmacSha256::new_from_slice(token.as_bytes()).expect("any key length");
        mac.update(b"medray report links v1");
        Self {
            key: mac.finalize().into_bytes().into(),
        }
    }

    fn mac(&self, scope: &str, expires: u64) -> HmacSha256 {
        use hmac::{KeyInit, Mac};
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("any key length");
        mac.update(scope.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// The signature of `scope` (a job id or [`INDEX_SCOPE`]) until `expires` (Unix
    /// seconds), hex.
    #[must_use]
    pub fn sign(&self, scope: &str, expires: u64) -> String {
        use hmac::Mac;
        hex::encode(self.mac(scope, expires).finalize().into_bytes())
    }

    /// The query string of a link: `exp=...&sig=...`.
    #[must_use]
    pub fn query(&self, scope: &str, expires: u64) -> String {
        format!("exp={expires}&sig={}", self.sign(scope, expires))
    }

    /// Whether `sig` signs `scope` until `expires`, and `now` (Unix seconds) is before then;
    /// compared in constant time.
    #[must_use]
    pub fn verify(&self, scope: &str, expires: u64, sig: &str, now: u64) -> bool {
        use hmac::Mac;
        let Ok(sig) = hex::decode(sig) else {
            return false;
        };
        now < expires && self.mac(scope, expires).verify_slice(&sig).is_ok()
    }
}

#[cfg(test)]
mod link_tests {
    use super::*;

    #[test]
    fn a_link_opens_its_own_scope_until_it_expires_and_nothing_else() {
        let signer = LinkSigner::new("0123456789abcdef-token");
        let sig = signer.sign("job-000001", 1_000);
        assert!(signer.verify("job-000001", 1_000, &sig, 999));
        assert!(!signer.verify("job-000001", 1_000, &sig, 1_000), "expired");
        assert!(
            !signer.verify("job-000002", 1_000, &sig, 999),
            "another job"
        );
        assert!(
            !signer.verify("job-000001", 2_000, &sig, 999),
            "a later expiry"
        );
        assert!(!signer.verify("job-000001", 1_000, "zz", 999), "not hex");
        let other = LinkSigner::new("another-cluster-token");
        assert!(
            !other.verify("job-000001", 1_000, &sig, 999),
            "another token"
        );
        assert!(!format!("{signer:?}").contains(&hex::encode(signer.key)));
    }
}
