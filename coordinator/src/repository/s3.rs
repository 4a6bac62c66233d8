//! A repository in an S3 bucket (AWS, MinIO, Ceph, any S3-compatible store),
//! under an optional key prefix.
//!
//! - **Whole or nothing**: every object is written with one `PutObject`,
//!   which S3 applies atomically; chunks are at most 8 MiB and manifests
//!   small, so no multipart upload is needed.
//! - **Never hangs**: connect, read, per-attempt and per-operation timeouts
//!   (all bounded by `repository.request_timeout`), a bounded standard retry
//!   policy, and an outer deadline around every request including reading
//!   the body of a `GetObject`.
//! - **Bounded concurrency**: every request holds a permit of a semaphore
//!   sized by `repository.max_concurrent_requests`, so any number of callers
//!   can `put` at once without opening more connections than that.
//! - **Errors say what the store said**: the S3 error code and message
//!   (`SignatureDoesNotMatch`, `NoSuchBucket`, `AccessDenied`, ...) or the
//!   transport failure (connection refused, TLS, timeout) in
//!   [`RepositoryError::Storage`], with the bucket and endpoint.
//! - **One crypto provider**: the SDK is built without default features
//!   and given our own HTTP client, rustls on ring (see `CRATES.md`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
use bytes::Bytes;
use tokio::sync::Semaphore;

use super::{ObjectKey, ObjectStat, RepositoryError, Result};

/// Attempts per request (the first one plus retries) for retryable
/// failures: throttling, 5xx, connection errors.
pub const MAX_ATTEMPTS: u32 = 3;
/// The first retry waits up to this long (with jitter), doubling after.
const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Establishing a connection never takes longer than this, whatever the
/// request timeout.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// What ListObjectsV2 returns per page at most (S3's own maximum).
pub const DEFAULT_LIST_PAGE_SIZE: i32 = 1000;

/// An error and its causes on one line (`dispatch failure: io error: ...:
/// Connection refused`), each cause once.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !cause_text.is_empty() && !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        f.write_str(&text)
    }
}

/// Static credentials for the store. The secret never appears in `Debug`.
#[derive(Clone)]
pub struct S3Credentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

impl S3Credentials {
    pub fn new(
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
        session_token: Option<String>,
    ) -> S3Credentials {
        S3Credentials {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token,
        }
    }

    /// From the standard variables `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and (optional) `AWS_SESSION_TOKEN`.
    pub fn from_env() -> Result<S3Credentials> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|value| value.trim().to_string())
                .filter(|value| !value.is_empty())
        };
        match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(access_key_id), Some(secret_access_key)) => Ok(S3Credentials::new(
                access_key_id,
                secret_access_key,
                var("AWS_SESSION_TOKEN"),
            )),
            _ => Err(RepositoryError::Invalid(
                "no S3 credentials: set repository.access_key_id and \
                 repository.secret_access_key_file, or the environment variables \
                 AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                    .into(),
            )),
        }
    }

    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Everything an [`S3Store`] needs; `repository.*` in `coordinator.toml`
/// becomes one of these (`RepositoryConfig::open_store`).
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    /// Key prefix inside the bucket (`fleet-a` or `fleet-a/`); empty for the
    /// bucket's root.
    pub prefix: String,
    pub region: String,
    /// `http(s)://host:port` of an S3-compatible store; `None` for AWS.
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which MinIO and most
    /// on-premise stores need.
    pub path_style: bool,
    pub credentials: S3Credentials,
    /// A PEM file of CA certificates. When set, only these are trusted for
    /// the endpoint's TLS certificate (not the system's roots).
    pub ca_bundle: Option<PathBuf>,
    pub max_concurrent_requests: usize,
    /// Bounds every request: connecting (at most 10 s), the answer, the
    /// whole operation with its retries, and reading a body.
    pub request_timeout: Duration,
    /// Keys per ListObjectsV2 page (1..=1000); smaller only in tests.
    pub list_page_size: i32,
}

impl S3Settings {
    /// Settings with the defaults of `coordinator.toml`.
    pub fn new(bucket: impl Into<String>, credentials: S3Credentials) -> S3Settings {
        S3Settings {
            bucket: bucket.into(),
            prefix: String::new(),
            region: "us-east-1".into(),
            endpoint: None,
            path_style: false,
            credentials,
            ca_bundle: None,
            max_concurrent_requests: 8,
            request_timeout: Duration::from_secs(60),
            list_page_size: DEFAULT_LIST_PAGE_SIZE,
        }
    }
}

#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Empty, or ending in `/`.
    prefix: String,
    location: String,
    permits: Arc<Semaphore>,
    /// Set once HeadBucket has shown the bucket exists (see
    /// [`S3Store::check_bucket`]).
    bucket_seen: Arc<AtomicBool>,
    max_concurrent_requests: usize,
    request_timeout: Duration,
    list_page_size: i32,
}

/// Checks a key prefix and puts it in its stored form: empty, or
/// `/`-separated non-empty segments of `[A-Za-z0-9._-]` ending in `/`.
pub fn normalize_prefix(prefix: &str) -> Result<String> {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    let valid = trimmed.len() <= 256
        && trimmed.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if !valid {
        return Err(RepositoryError::Invalid(format!(
            "S3 prefix {prefix:?}: use `/`-separated segments of letters, digits, `.`, `_` and `-`"
        )));
    }
    Ok(format!("{trimmed}/"))
}

/// Reads and checks a PEM bundle of CA certificates, as rustls will load
/// it (the HTTP client panics on a bad one, so it is checked here first).
fn read_ca_bundle(path: &std::path::Path) -> Result<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| {
        RepositoryError::Invalid(format!("cannot read the CA bundle {}: {e}", path.display()))
    })?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            RepositoryError::Invalid(format!(
                "the CA bundle {} is not valid PEM: {e}",
                path.display()
            ))
        })?;
    if certificates.is_empty() {
        return Err(RepositoryError::Invalid(format!(
            "the CA bundle {} holds no certificate",
            path.display()
        )));
    }
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates {
        roots.add(certificate).map_err(|e| {
            RepositoryError::Invalid(format!(
                "the CA bundle {} holds a certificate that cannot be a trust anchor: {e}",
                path.display()
            ))
        })?;
    }
    Ok(pem)
}

impl S3Store {
    /// Builds the client; no request is sent until the first operation.
    pub fn new(settings: S3Settings) -> Result<S3Store> {
        let prefix = normalize_prefix(&settings.prefix)?;
        if settings.bucket.is_empty() {
            return Err(RepositoryError::Invalid("S3 bucket name is empty".into()));
        }
        if !(1..=64).contains(&settings.max_concurrent_requests) {
            return Err(RepositoryError::Invalid(
                "S3 max_concurrent_requests must be between 1 and 64".into(),
            ));
        }
        if settings.request_timeout.is_zero() {
            return Err(RepositoryError::Invalid(
                "S3 request_timeout must not be zero".into(),
            ));
        }
        if !(1..=1000).contains(&settings.list_page_size) {
            return Err(RepositoryError::Invalid(
                "S3 list page size must be between 1 and 1000".into(),
            ));
        }

        let trust_store = match &settings.ca_bundle {
            Some(path) => TrustStore::empty()
                .with_native_roots(false)
                .with_pem_certificate(read_ca_bundle(path)?),
            None => TrustStore::default(),
        };
        let tls_context = TlsContext::builder()
            .with_trust_store(trust_store)
            .build()
            .map_err(|e| RepositoryError::Invalid(format!("S3 TLS settings: {e}")))?;
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .tls_context(tls_context)
            .build_https();

        let timeout = settings.request_timeout;
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(timeout.min(MAX_CONNECT_TIMEOUT))
            .read_timeout(timeout)
            .operation_attempt_timeout(timeout)
            .operation_timeout(timeout)
            .build();
        let retries = RetryConfig::standard()
            .with_max_attempts(MAX_ATTEMPTS)
            .with_initial_backoff(INITIAL_BACKOFF);
        let credentials = Credentials::new(
            settings.credentials.access_key_id.clone(),
            settings.credentials.secret_access_key.clone(),
            settings.credentials.session_token.clone(),
            None,
            "cairn",
        );
        let mut builder = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .http_client(http_client)
            .region(Region::new(settings.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(settings.path_style)
            .retry_config(retries)
            .timeout_config(timeouts);
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.endpoint_url(endpoint.trim_end_matches('/'));
        }
        let client = Client::from_conf(builder.build());

        let at = match &settings.endpoint {
            Some(endpoint) => endpoint.trim_end_matches('/').to_string(),
            None => format!("AWS region {}", settings.region),
        };
        Ok(S3Store {
            client,
            location: format!("s3://{}/{prefix} at {at}", settings.bucket),
            bucket: settings.bucket,
            prefix,
            permits: Arc::new(Semaphore::new(settings.max_concurrent_requests)),
            bucket_seen: Arc::new(AtomicBool::new(false)),
            max_concurrent_requests: settings.max_concurrent_requests,
            request_timeout: timeout,
            list_page_size: settings.list_page_size,
        })
    }

    pub fn describe(&self) -> String {
        self.location.clone()
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// How many requests this store sends at once at most; callers that
    /// upload in parallel gain nothing from more workers than this.
    pub fn max_concurrent_requests(&self) -> usize {
        self.max_concurrent_requests
    }

    fn full_key(&self, key: &ObjectKey) -> String {
        format!("{}{}", self.prefix, key.as_str())
    }

    fn storage_error(&self, key: &str, message: String) -> RepositoryError {
        RepositoryError::Storage {
            key: key.to_string(),
            message: format!("{message} ({})", self.location),
        }
    }

    /// What an SDK error says, as one line: the service's code and message
    /// with the HTTP status, or the transport failure and its causes.
    fn sdk_message<E>(&self, operation: &str, error: &SdkError<E>) -> String
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let status = error.raw_response().map(|r| r.status().as_u16());
        match error {
            SdkError::ServiceError(service) => {
                let inner = service.err();
                let code = inner.code();
                let message = inner.message();
                match (code, message, status) {
                    (Some(code), Some(message), Some(status)) => {
                        format!("{operation}: {code}: {message} (HTTP {status})")
                    }
                    (Some(code), None, Some(status)) => {
                        format!("{operation}: {code} (HTTP {status})")
                    }
                    // HEAD answers carry no body, so no error code.
                    (None, _, Some(403)) => format!(
                        "{operation}: AccessDenied (HTTP 403): the credentials are wrong \
                         or not allowed to access bucket {}",
                        self.bucket
                    ),
                    (None, _, Some(status)) => format!("{operation}: HTTP {status}"),
                    _ => format!("{operation}: {}", ErrorChain(error)),
                }
            }
            SdkError::TimeoutError(_) => format!(
                "{operation}: no answer within {} (repository.request_timeout): {}",
                humantime::format_duration(self.request_timeout),
                ErrorChain(error)
            ),
            _ => format!("{operation}: {}", ErrorChain(error)),
        }
    }

    /// Runs one request under a concurrency permit and the outer deadline.
    async fn request<T, F>(&self, key: &str, operation: &str, future: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        let _permit =
            self.permits.acquire().await.map_err(|_| {
                self.storage_error(key, format!("{operation}: the store is closed"))
            })?;
        // The SDK's operation timeout covers the request; this also covers
        // reading a response body, with a little slack so the SDK's own,
        // more precise error wins when both fire.
        let deadline = self.request_timeout + Duration::from_secs(1);
        match tokio::time::timeout(deadline, future).await {
            Ok(result) => result,
            Err(_) => Err(self.storage_error(
                key,
                format!(
                    "{operation}: no answer within {} (repository.request_timeout)",
                    humantime::format_duration(self.request_timeout)
                ),
            )),
        }
    }

    /// Before "no such object" is believed, the bucket must be shown to
    /// exist, once per store: a HEAD answer has no body to tell a missing
    /// bucket from a missing key, and some S3-compatible servers answer
    /// NoSuchKey for objects of a missing bucket. Only a 404 for the bucket
    /// is an error; when HeadBucket is not allowed (it needs
    /// `s3:ListBucket`), the object's answer stands.
    async fn check_bucket(&self, key: &str) -> Result<()> {
        if self.bucket_seen.load(Ordering::Relaxed) {
            return Ok(());
        }
        let answer = self
            .request(key, "HeadBucket", async {
                Ok(self.client.head_bucket().bucket(&self.bucket).send().await)
            })
            .await?;
        match answer {
            Ok(_) => {
                self.bucket_seen.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(error)
                if error
                    .raw_response()
                    .is_some_and(|r| r.status().as_u16() == 404) =>
            {
                Err(self.storage_error(
                    key,
                    format!(
                        "HeadBucket: NoSuchBucket: bucket {} does not exist (HTTP 404)",
                        self.bucket
                    ),
                ))
            }
            Err(_) => Ok(()),
        }
    }

    /// Stores `bytes` under `key` with one PutObject: readers see the whole
    /// object or none.
    pub async fn put(&self, key: &ObjectKey, bytes: Bytes) -> Result<()> {
        let full = self.full_key(key);
        self.request(key.as_str(), "PutObject", async {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&full)
                .content_length(i64::try_from(bytes.len()).unwrap_or(i64::MAX))
                .body(ByteStream::from(bytes))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.storage_error(key.as_str(), self.sdk_message("PutObject", &e)))
        })
        .await
    }

    pub async fn get(&self, key: &ObjectKey) -> Result<Bytes> {
        let full = self.full_key(key);
        let found = self
            .request(key.as_str(), "GetObject", async {
                let output = match self
                    .client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(&full)
                    .send()
                    .await
                {
                    Ok(output) => output,
                    Err(error) => {
                        let no_such_key = error
                            .as_service_error()
                            .is_some_and(|e| e.is_no_such_key() || e.code() == Some("NoSuchKey"));
                        // A 404 without a code is a missing key too, but
                        // NoSuchBucket (also 404) must not read as "no object".
                        let bare_404 = error
                            .raw_response()
                            .is_some_and(|r| r.status().as_u16() == 404)
                            && error.as_service_error().and_then(|e| e.code()).is_none();
                        if no_such_key || bare_404 {
                            return Ok(None);
                        }
                        return Err(
                            self.storage_error(key.as_str(), self.sdk_message("GetObject", &error))
                        );
                    }
                };
                output
                    .body
                    .collect()
                    .await
                    .map(|data| Some(data.into_bytes()))
                    .map_err(|e| {
                        self.storage_error(
                            key.as_str(),
                            format!("GetObject: reading the body: {}", ErrorChain(&e)),
                        )
                    })
            })
            .await?;
        match found {
            Some(bytes) => Ok(bytes),
            None => {
                self.check_bucket(key.as_str()).await?;
                Err(RepositoryError::NotFound(key.to_string()))
            }
        }
    }

    pub async fn exists(&self, key: &ObjectKey) -> Result<bool> {
        let full = self.full_key(key);
        let found = self
            .request(key.as_str(), "HeadObject", async {
                match self
                    .client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(&full)
                    .send()
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(error) => {
                        let not_found = error.as_service_error().is_some_and(|e| e.is_not_found())
                            || error
                                .raw_response()
                                .is_some_and(|r| r.status().as_u16() == 404);
                        if not_found {
                            Ok(false)
                        } else {
                            Err(self.storage_error(
                                key.as_str(),
                                self.sdk_message("HeadObject", &error),
                            ))
                        }
                    }
                }
            })
            .await?;
        if !found {
            self.check_bucket(key.as_str()).await?;
        }
        Ok(found)
    }

    /// Every object whose name starts with `prefix`, sorted, following
    /// ListObjectsV2 pages. Names that are not valid object keys (written
    /// by someone else into the bucket) are skipped, as the local store
    /// skips stray files.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectKey>> {
        let mut keys = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let (page, next) = self.list_page(prefix, continuation.take()).await?;
            keys.extend(page);
            match next {
                Some(token) => continuation = Some(token),
                None => break,
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// Sends every object under `prefix` to `sender` page by page, in the
    /// order S3 lists them (by key); stops early if the receiver is gone.
    pub async fn list_into(
        &self,
        prefix: &str,
        sender: &tokio::sync::mpsc::Sender<Result<ObjectKey>>,
    ) -> Result<()> {
        let mut continuation: Option<String> = None;
        loop {
            let (page, next) = self.list_page(prefix, continuation.take()).await?;
            for key in page {
                if sender.send(Ok(key)).await.is_err() {
                    return Ok(());
                }
            }
            match next {
                Some(token) => continuation = Some(token),
                None => return Ok(()),
            }
        }
    }

    /// One page of `ListObjectsV2`: the valid object names on it and the
    /// continuation token of the next page, if any.
    async fn list_page(
        &self,
        prefix: &str,
        continuation: Option<String>,
    ) -> Result<(Vec<ObjectKey>, Option<String>)> {
        let full_prefix = format!("{}{prefix}", self.prefix);
        let label = format!("{prefix}*");
        let page = self
            .request(&label, "ListObjectsV2", async {
                self.client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&full_prefix)
                    .max_keys(self.list_page_size)
                    .set_continuation_token(continuation.clone())
                    .send()
                    .await
                    .map_err(|e| self.storage_error(&label, self.sdk_message("ListObjectsV2", &e)))
            })
            .await?;
        let keys = page
            .contents()
            .iter()
            .filter_map(|object| {
                let relative = object.key()?.strip_prefix(&self.prefix)?;
                ObjectKey::new(relative).ok()
            })
            .collect();
        if !page.is_truncated().unwrap_or(false) {
            return Ok((keys, None));
        }
        match page.next_continuation_token() {
            Some(token) if continuation.as_deref() != Some(token) => {
                Ok((keys, Some(token.to_string())))
            }
            _ => Err(self.storage_error(
                &label,
                "ListObjectsV2: a truncated page without a new continuation token".into(),
            )),
        }
    }

    /// The object's size and LastModified, `None` if there is none.
    pub async fn stat(&self, key: &ObjectKey) -> Result<Option<ObjectStat>> {
        let full = self.full_key(key);
        self.request(key.as_str(), "HeadObject", async {
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
            {
                Ok(head) => {
                    let modified_ms = head
                        .last_modified()
                        .and_then(|at| at.to_millis().ok())
                        .ok_or_else(|| {
                            self.storage_error(
                                key.as_str(),
                                "HeadObject: no LastModified in the answer".to_string(),
                            )
                        })?;
                    Ok(Some(ObjectStat {
                        bytes: head
                            .content_length()
                            .and_then(|length| u64::try_from(length).ok())
                            .unwrap_or(0),
                        modified_ms,
                    }))
                }
                Err(error) => {
                    let not_found = error.as_service_error().is_some_and(|e| e.is_not_found())
                        || error
                            .raw_response()
                            .is_some_and(|r| r.status().as_u16() == 404);
                    if not_found {
                        Ok(None)
                    } else {
                        Err(self
                            .storage_error(key.as_str(), self.sdk_message("HeadObject", &error)))
                    }
                }
            }
        })
        .await
    }

    /// Deletes `key`; deleting a missing object succeeds, as in S3.
    pub async fn delete(&self, key: &ObjectKey) -> Result<()> {
        let full = self.full_key(key);
        self.request(key.as_str(), "DeleteObject", async {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.storage_error(key.as_str(), self.sdk_message("DeleteObject", &e)))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(normalize_prefix("").unwrap(), "");
        assert_eq!(normalize_prefix("/").unwrap(), "");
        assert_eq!(normalize_prefix("fleet-a").unwrap(), "fleet-a/");
        assert_eq!(normalize_prefix("/a/B_1/").unwrap(), "a/B_1/");
        assert!(normalize_prefix("a//b").is_err());
        assert!(normalize_prefix("a/../b").is_err());
        assert!(normalize_prefix("a b").is_err());
    }

    #[test]
    fn secrets_are_not_debugged() {
        let credentials = S3Credentials::new("AKID", "very-secret", Some("token-secret".into()));
        let text = format!("{:?}", S3Settings::new("bucket", credentials));
        assert!(text.contains("AKID"), "{text}");
        assert!(!text.contains("very-secret"), "{text}");
        assert!(!text.contains("token-secret"), "{text}");
    }

    #[test]
    fn describe_names_bucket_prefix_and_endpoint() {
        let mut settings = S3Settings::new("backups", S3Credentials::new("a", "b", None));
        settings.prefix = "fleet-a".into();
        settings.endpoint = Some("http://127.0.0.1:9000/".into());
        let store = S3Store::new(settings).unwrap();
        assert_eq!(
            store.describe(),
            "s3://backups/fleet-a/ at http://127.0.0.1:9000"
        );
    }

    #[test]
    fn bad_ca_bundles_are_refused_not_panicked_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let mut settings = S3Settings::new("backups", S3Credentials::new("a", "b", None));
        settings.ca_bundle = Some(path.clone());
        let error = S3Store::new(settings.clone()).unwrap_err().to_string();
        assert!(error.contains("holds no certificate"), "{error}");
        settings.ca_bundle = Some(dir.path().join("missing.pem"));
        let error = S3Store::new(settings).unwrap_err().to_string();
        assert!(error.contains("cannot read the CA bundle"), "{error}");
    }
}
