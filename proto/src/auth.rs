//! The cluster token on gRPC calls: clients attach it with [`BearerToken`]; the head checks
//! it with [`check_bearer`]. The token's value is never printed (its `Debug` is redacted).

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

/// Checks the bearer token of a call against `expected`, in constant time.
///
/// # Errors
/// `Unauthenticated` when the token is missing, malformed or wrong; the message never
/// contains either token.
pub fn check_bearer(metadata: &MetadataMap, expected: &str) -> Result<(), Status> {
    let Some(value) = metadata.get(AUTHORIZATION_HEADER) else {
        return Err(Status::unauthenticated(
            "missing cluster token (set --token or MEDRAY_TOKEN)",
        ));
    };
    let presented = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("malformed authorization header"))?;
    let equal: bool =
        subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), expected.as_bytes()).into();
    if equal {
        Ok(())
    } else {
        Err(Status::unauthenticated("wrong cluster token"))
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
}
