//! A real S3-protocol server on loopback: s3s with the s3s-fs backend (one
//! directory per bucket in a temporary data directory), SigV4
//! authentication with one access key, served by hyper over a TCP
//! listener on `127.0.0.1:0`, over plain HTTP or TLS with a throwaway CA.
//!
//! The server runs on its own thread and tokio runtime, so both sync tests
//! and `#[tokio::test]`s can use it. Dropping it stops it: the listener and
//! every open connection are closed, and the data directory is removed.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnectionBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::sync::oneshot;

pub const ACCESS_KEY: &str = "cairn-test-access-key";
pub const SECRET_KEY: &str = "cairn-test-secret-key-0123456789";
pub const REGION: &str = "us-east-1";

#[derive(Debug)]
pub struct S3Server {
    endpoint: String,
    data_dir: tempfile::TempDir,
    ca_pem: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl S3Server {
    /// Starts a plain-HTTP server (`http://127.0.0.1:PORT`).
    pub fn start() -> S3Server {
        S3Server::start_with(None)
    }

    /// Starts a server behind TLS with a certificate for `127.0.0.1` and
    /// `localhost` signed by a fresh CA ([`S3Server::ca_pem`]), so clients
    /// must be told to trust that CA.
    pub fn start_tls() -> S3Server {
        let ca_key = rcgen::KeyPair::generate().expect("generate the test S3 CA key");
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("test S3 CA parameters");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cairn test S3 CA");
        let ca_certificate = ca_params
            .self_signed(&ca_key)
            .expect("self-sign the test S3 CA");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let server_key = rcgen::KeyPair::generate().expect("generate the test S3 server key");
        let server_certificate =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("test S3 server certificate parameters")
                .signed_by(&server_key, &issuer)
                .expect("sign the test S3 server certificate");

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("rustls protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![server_certificate.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
            )
            .expect("rustls server config for the test S3 server");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let tls = TlsSetup {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            ca_pem: ca_certificate.pem(),
        };
        S3Server::start_with(Some(tls))
    }

    fn start_with(tls: Option<TlsSetup>) -> S3Server {
        let data_dir = tempfile::Builder::new()
            .prefix("cairn-s3-")
            .tempdir()
            .expect("create the S3 server's data directory");
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind the S3 server to a free loopback port");
        listener
            .set_nonblocking(true)
            .expect("make the S3 listener non-blocking");
        let port = listener.local_addr().expect("S3 listener address").port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{port}");
        let ca_pem = tls.as_ref().map(|t| t.ca_pem.clone());

        let file_system = s3s_fs::FileSystem::new(data_dir.path())
            .unwrap_or_else(|e| panic!("s3s-fs on {}: {e:?}", data_dir.path().display()));
        let mut builder = S3ServiceBuilder::new(file_system);
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();

        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("s3-server-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("the S3 server's runtime");
                runtime.block_on(serve(listener, service, tls, stopped));
                // Dropping the runtime drops every connection task, which
                // closes their sockets.
                runtime.shutdown_background();
            })
            .expect("start the S3 server thread");
        S3Server {
            endpoint,
            data_dir,
            ca_pem,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Writes the server's secret key to `dir/s3-secret` (0600), as a
    /// coordinator's `secret_access_key_file`; its path.
    pub fn write_secret_file(&self, dir: &Path) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let file = dir.join("s3-secret");
        std::fs::write(&file, self.secret_key()).expect("write the S3 secret file");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
            .expect("make the S3 secret file private");
        file
    }

    /// The `[repository]` table of a coordinator.toml that stores in
    /// `bucket` under `prefix` on this server, its secret key read from
    /// `secret_file`.
    pub fn repository_table(&self, bucket: &str, prefix: &str, secret_file: &Path) -> String {
        format!(
            "[repository]\nkind = \"s3\"\nbucket = \"{bucket}\"\nprefix = \"{prefix}\"\n\
             endpoint = \"{}\"\npath_style = true\nregion = \"{}\"\n\
             access_key_id = \"{}\"\nsecret_access_key_file = \"{}\"\nrequest_timeout = \"10s\"\n",
            self.endpoint(),
            self.region(),
            self.access_key(),
            secret_file.display()
        )
    }

    /// `http://127.0.0.1:PORT` (or `https://` for [`S3Server::start_tls`]).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn access_key(&self) -> &str {
        ACCESS_KEY
    }

    pub fn secret_key(&self) -> &str {
        SECRET_KEY
    }

    pub fn region(&self) -> &str {
        REGION
    }

    /// The CA certificate (PEM) that signed the TLS server's certificate.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Where s3s-fs keeps the buckets: `DATA_DIR/<bucket>/<key>`.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// A real SDK client for this server (path-style, the test keys), on
    /// rustls with ring like the coordinator's.
    pub fn client(&self) -> aws_sdk_s3::Client {
        let trust_store = match &self.ca_pem {
            Some(pem) => TrustStore::empty().with_pem_certificate(pem.as_bytes()),
            None => TrustStore::default(),
        };
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .tls_context(
                TlsContext::builder()
                    .with_trust_store(trust_store)
                    .build()
                    .expect("TLS context"),
            )
            .build_https();
        let config = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .http_client(http_client)
            .region(Region::new(REGION))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new(
                ACCESS_KEY,
                SECRET_KEY,
                None,
                None,
                "cairn-test",
            ))
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// Creates a bucket through the S3 API. Callable from sync code and
    /// from inside a tokio runtime alike (it runs on a thread of its own).
    pub fn create_bucket(&self, name: &str) {
        let client = self.client();
        let name = name.to_string();
        let endpoint = self.endpoint.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for create_bucket");
            runtime
                .block_on(client.create_bucket().bucket(&name).send())
                .unwrap_or_else(|e| {
                    panic!(
                        "create bucket {name} at {endpoint}: {}",
                        aws_sdk_s3::error::DisplayErrorContext(&e)
                    )
                });
        })
        .join()
        .expect("the create_bucket thread panicked");
    }

    /// Stops the server now (as dropping it does): afterwards connections
    /// to its port are refused. The data directory stays until drop.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

struct TlsSetup {
    acceptor: tokio_rustls::TlsAcceptor,
    ca_pem: String,
}

async fn serve(
    listener: std::net::TcpListener,
    service: s3s::service::S3Service,
    tls: Option<TlsSetup>,
    mut stopped: oneshot::Receiver<()>,
) {
    let listener =
        tokio::net::TcpListener::from_std(listener).expect("register the S3 listener with tokio");
    let acceptor = tls.map(|t| t.acceptor);
    loop {
        let socket = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(_) => continue,
            },
        };
        let service = service.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let builder = ConnectionBuilder::new(TokioExecutor::new());
            match acceptor {
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                }
                Some(acceptor) => {
                    let Ok(stream) = acceptor.accept(socket).await else {
                        return;
                    };
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}
