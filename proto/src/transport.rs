//! Client channels to the head, plain or TLS (rustls with the aws-lc-rs provider).

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// TLS settings of a client: the CA that signed the head's certificate and, optionally, the
/// name to verify (default: the host of the address).
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// PEM of the CA certificate(s).
    pub ca_pem: Vec<u8>,
    /// Server name to verify instead of the address's host.
    pub domain: Option<String>,
}

/// Opens a channel to `address` (`http://host:port` or `https://host:port`).
///
/// # Errors
/// The transport error when the address is invalid or the head cannot be reached within
/// `connect_timeout`.
pub async fn connect(
    address: &str,
    tls: Option<&ClientTls>,
    connect_timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    endpoint(address, tls, connect_timeout)?.connect().await
}

/// The endpoint for `address`, for callers that connect lazily.
///
/// # Errors
/// The transport error when the address or the TLS settings are invalid.
pub fn endpoint(
    address: &str,
    tls: Option<&ClientTls>,
    connect_timeout: Duration,
) -> Result<Endpoint, tonic::transport::Error> {
    let mut endpoint = Endpoint::from_shared(address.to_string())?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(crate::HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(crate::HTTP2_CONNECTION_WINDOW_BYTES)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    if let Some(tls) = tls {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
        if let Some(domain) = &tls.domain {
            config = config.domain_name(domain.clone());
        }
        endpoint = endpoint.tls_config(config)?;
    }
    Ok(endpoint)
}
