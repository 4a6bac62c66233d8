//! Mutual TLS in one place: the coordinator's server config with a client
//! verifier that consults a live revocation set, the client configs of
//! agents and operators, the pinned-CA verifier used once at enrollment, the
//! TLS accept loop that feeds tonic, and the connector that dials it.
//!
//! Why not tonic's own TLS settings: they have no hook for a custom client
//! verifier, so a revoked certificate could not be refused at the handshake,
//! and no hook for a pinned CA, which enrollment needs before the agent
//! trusts anything.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use tokio::net::{TcpSocket, TcpStream};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::Error;
use crate::identity::certificate_serial;
use crate::pki::ca_fingerprint;

mod incoming;
mod primed;

pub use incoming::{
    HandshakeRefusedCallback, IncomingLimits, ServerStream, client_network, tls_incoming,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The one crypto provider in the process (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate in a PEM blob.
pub fn parse_certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{what}: not valid PEM: {e}")))?;
    if certificates.is_empty() {
        return Err(Error::Tls(format!("{what}: no certificate found")));
    }
    Ok(certificates)
}

/// Parses a PEM private key.
pub fn parse_private_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| Error::Tls(format!("{what}: not a valid PEM private key: {e}")))
}

fn root_store(ca_pem: &[u8]) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for certificate in parse_certificates(ca_pem, "CA certificate")? {
        roots
            .add(certificate)
            .map_err(|e| Error::Tls(format!("CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Serials (lower-case hex of the DER INTEGER) that must be refused. Shared
/// by the handshake verifier and the per-call check, and updated at run time
/// so that a revocation bites on the next call without a restart.
#[derive(Debug, Clone, Default)]
pub struct RevokedSerials {
    serials: Arc<RwLock<HashSet<String>>>,
}

impl RevokedSerials {
    pub fn new(serials: impl IntoIterator<Item = String>) -> Self {
        RevokedSerials {
            serials: Arc::new(RwLock::new(serials.into_iter().collect())),
        }
    }

    pub fn insert(&self, serial: String) {
        let mut serials = self.serials.write().unwrap_or_else(|e| e.into_inner());
        serials.insert(serial);
    }

    pub fn contains(&self, serial: &str) -> bool {
        let serials = self.serials.read().unwrap_or_else(|e| e.into_inner());
        serials.contains(serial)
    }

    /// Forgets `serials`: only those of certificates past their validity,
    /// which the verifier refuses anyway, so the set does not grow with
    /// every renewal for as long as the process runs.
    pub fn forget_expired(&self, serials: impl IntoIterator<Item = String>) -> usize {
        let mut set = self.serials.write().unwrap_or_else(|e| e.into_inner());
        serials
            .into_iter()
            .filter(|serial| set.remove(serial))
            .count()
    }

    pub fn len(&self) -> usize {
        self.serials.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The fleet CA's WebPKI verifier (chain, validity period, signatures), plus
/// the revocation set. Client certificates are optional at the handshake so
/// that an agent can enroll with only its token; every RPC that needs an
/// identity then refuses a caller without one.
struct RevocationAwareVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: RevokedSerials,
}

impl std::fmt::Debug for RevocationAwareVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationAwareVerifier")
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for RevocationAwareVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let serial = certificate_serial(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.revoked.contains(&serial) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// PEM material of the coordinator's TLS identity.
#[derive(Debug, Clone)]
pub struct ServerTlsMaterial {
    pub ca_pem: Vec<u8>,
    pub certificate_pem: Vec<u8>,
    /// Secret.
    pub key_pem: Vec<u8>,
}

/// The coordinator's rustls config: its certificate chain (leaf then CA, so
/// an enrolling agent can check the CA against its token's pin), optional
/// client certificates verified against the fleet CA, and the revocation set.
pub fn server_config(
    material: &ServerTlsMaterial,
    revoked: RevokedSerials,
) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider();
    let roots = Arc::new(root_store(&material.ca_pem)?);
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::Tls(format!("client verifier: {e}")))?;
    let verifier = Arc::new(RevocationAwareVerifier { inner, revoked });
    let mut chain = parse_certificates(&material.certificate_pem, "server certificate")?;
    chain.extend(parse_certificates(&material.ca_pem, "CA certificate")?);
    let key = parse_private_key(&material.key_pem, "server key")?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| Error::Tls(format!("server certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: a resumed session skips the client verifier,
    // and so would skip a revocation made since the first handshake.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client's TLS config: trust the fleet CA, present `identity` if given.
pub fn client_config(
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<Arc<ClientConfig>, Error> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(root_store(ca_pem)?);
    let mut config = match identity {
        Some((certificate_pem, key_pem)) => builder
            .with_client_auth_cert(
                parse_certificates(certificate_pem, "client certificate")?,
                parse_private_key(key_pem, "client key")?,
            )
            .map_err(|e| Error::Tls(format!("client certificate and key: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The files of a client identity directory (an operator's, or an agent's
/// `identity/`): `ca.pem`, `cert.pem`, `key.pem` (0600).
#[derive(Debug, Clone)]
pub struct IdentityPaths {
    pub ca: std::path::PathBuf,
    pub certificate: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl IdentityPaths {
    pub fn in_dir(dir: &std::path::Path) -> Self {
        IdentityPaths {
            ca: dir.join("ca.pem"),
            certificate: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }

    /// The client config that trusts this identity's CA and presents its
    /// certificate; a missing file is named in the error.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, Error> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))
        };
        client_config(
            &read(&self.ca)?,
            Some((&read(&self.certificate)?, &read(&self.key)?)),
        )
    }
}

/// The client config an enrolling agent uses: it trusts no CA yet, only a
/// SHA-256 pin of one. The server must send the CA in its chain; the chain is
/// then verified with that CA as the only root, names and dates included.
pub fn pinned_client_config(ca_sha256_hex: &str) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let verifier = Arc::new(PinnedCaVerifier {
        pin: ca_sha256_hex.to_ascii_lowercase(),
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct PinnedCaVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned = intermediates
            .iter()
            .find(|certificate| ca_fingerprint(certificate) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the coordinator's CA does not match the token's CA hash".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(pinned.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Where a client dials: `https://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorUrl {
    pub host: String,
    pub port: u16,
}

impl CoordinatorUrl {
    pub const DEFAULT_PORT: u16 = 7443;

    pub fn parse(url: &str) -> Result<CoordinatorUrl, Error> {
        let invalid = |reason: &str| {
            Error::invalid(
                "coordinator URL",
                format!(
                    "{url:?}: {reason}; expected https://HOST:PORT, for example https://127.0.0.1:7443"
                ),
            )
        };
        let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(invalid("the scheme must be https"));
        }
        let host = uri.host().ok_or_else(|| invalid("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(invalid("no path is allowed"));
        }
        Ok(CoordinatorUrl {
            host,
            port: uri.port_u16().unwrap_or(Self::DEFAULT_PORT),
        })
    }
}

impl std::fmt::Display for CoordinatorUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "https://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "https://{}:{}", self.host, self.port)
        }
    }
}

/// Opens a gRPC channel to the coordinator over our own TLS config,
/// optionally from a given source address (each agent of a test fleet has
/// its own loopback address).
///
/// With TLS 1.3 a client finishes its side of the handshake before the
/// server checks the client certificate, so a refused certificate shows up
/// on the first call, not here.
pub async fn connect(
    url: &CoordinatorUrl,
    config: Arc<ClientConfig>,
    source_address: Option<IpAddr>,
) -> Result<Channel, Error> {
    let server_name = ServerName::try_from(url.host.clone())
        .map_err(|e| Error::invalid("coordinator URL", format!("bad host name: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let host = url.host.clone();
    let port = url.port;
    // tonic sees plain http: the TLS is ours, in the connector below.
    let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .map_err(|e| Error::Connect {
            url: url.to_string(),
            reason: e.to_string(),
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let connect = tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        let host = host.clone();
        async move {
            let tcp = dial(&host, port, source_address).await?;
            let tls = connector.connect(server_name, tcp).await?;
            let primed = primed::Primed::first_bytes(tls).await?;
            Ok::<_, std::io::Error>(TokioIo::new(primed))
        }
    });
    endpoint.connect_with_connector(connect).await.map_err(|e| {
        let reason = describe_transport_error(&e);
        let closed = find_cause::<std::io::Error>(&e)
            .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof);
        match received_alert(&e) {
            Some(alert) => Error::Refused {
                url: url.to_string(),
                reason,
                revoked: alert == rustls::AlertDescription::CertificateRevoked,
            },
            None if closed => Error::Refused {
                url: url.to_string(),
                reason,
                revoked: false,
            },
            None => Error::Connect {
                url: url.to_string(),
                reason,
            },
        }
    })
}

/// The first error of type `T` in `error`'s chain, looking inside
/// `io::Error`s too (TLS errors travel wrapped in them).
fn find_cause<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(found) = current.downcast_ref::<T>() {
            return Some(found);
        }
        if let Some(found) = current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<T>())
        {
            return Some(found);
        }
        cause = current.source();
    }
    None
}

/// The TLS alert the server sent, if `error` came from one (a refused
/// client certificate: unknown CA, expired, revoked).
pub fn received_alert(
    error: &(dyn std::error::Error + 'static),
) -> Option<rustls::AlertDescription> {
    match find_cause::<rustls::Error>(error) {
        Some(rustls::Error::AlertReceived(alert)) => Some(*alert),
        _ => None,
    }
}

async fn dial(host: &str, port: u16, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let mut last_error = None;
    for address in tokio::net::lookup_host((host, port)).await? {
        let socket = match address {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(source) = source {
            if source.is_ipv4() != address.is_ipv4() {
                continue;
            }
            socket.bind(SocketAddr::new(source, 0))?;
        }
        match socket.connect(address).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host} resolves to no usable address"),
        )
    }))
}

/// The innermost cause of a transport error, which is the useful part
/// ("connection refused", "certificate expired").
pub fn describe_transport_error(error: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        innermost = cause.to_string();
        source = cause.source();
    }
    innermost
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, expected: Option<(&str, u16)>) {
        let parsed = CoordinatorUrl::parse(url).ok();
        assert_eq!(
            parsed.as_ref().map(|u| (u.host.as_str(), u.port)),
            expected,
            "{url}"
        );
    }

    #[test]
    fn coordinator_urls() {
        check("https://127.0.0.1:7443", Some(("127.0.0.1", 7443)));
        check("https://coord.example:9000/", Some(("coord.example", 9000)));
        check("https://[::1]:7443", Some(("::1", 7443)));
        check("https://localhost", Some(("localhost", 7443)));
        check("http://127.0.0.1:7443", None);
        check("127.0.0.1:7443", None);
        check("https://127.0.0.1:7443/x", None);
    }

    #[test]
    fn revoked_serials() {
        let revoked = RevokedSerials::new(["00ca".to_string()]);
        assert!(revoked.contains("00ca"));
        assert!(!revoked.contains("ca"));
        revoked.insert("01".into());
        assert!(revoked.clone().contains("01"));
        assert_eq!(revoked.len(), 2);
        // Forgetting touches only the serials named, and counts them.
        assert_eq!(
            revoked.forget_expired(["00ca".to_string(), "ff".to_string()]),
            1
        );
        assert!(!revoked.contains("00ca") && revoked.contains("01"));
    }
}
