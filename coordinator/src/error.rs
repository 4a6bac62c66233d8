//! The one error type at the coordinator library's boundary, and its
//! mapping to gRPC status codes.

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Timeout(String),
    /// A bug or an impossible state; details go to the log.
    #[error("{0}")]
    Internal(String),
    // No `#[from]`: it would expose the cause as `source()` as well as in
    // the message (see `cairn_common::error`); the `From`s are below.
    #[error("catalog: {0}")]
    Catalog(sqlx::Error),
    #[error("catalog migration: {0}")]
    Migration(sqlx::migrate::MigrateError),
    #[error(transparent)]
    Common(#[from] cairn_common::Error),
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
}

impl From<sqlx::Error> for CoordinatorError {
    fn from(error: sqlx::Error) -> Self {
        CoordinatorError::Catalog(error)
    }
}

impl From<sqlx::migrate::MigrateError> for CoordinatorError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        CoordinatorError::Migration(error)
    }
}

impl CoordinatorError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CoordinatorError::Io {
            context: context.into(),
            cause: source,
        }
    }
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

impl From<CoordinatorError> for tonic::Status {
    fn from(error: CoordinatorError) -> Self {
        use tonic::Status;
        match error {
            CoordinatorError::NotFound(m) => Status::not_found(m),
            CoordinatorError::Conflict(m) => Status::failed_precondition(m),
            CoordinatorError::InvalidArgument(m) => Status::invalid_argument(m),
            CoordinatorError::Unauthenticated(m) => Status::unauthenticated(m),
            CoordinatorError::PermissionDenied(m) => Status::permission_denied(m),
            CoordinatorError::Unavailable(m) => Status::unavailable(m),
            CoordinatorError::Timeout(m) => Status::deadline_exceeded(m),
            CoordinatorError::Common(e) => e.into(),
            // Internal details (SQL, paths) go to the log, where they are
            // handled; the client gets an incident id to find them by.
            other => cairn_common::error::internal_status(&other),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Log lines, captured.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The status a client gets for `error`, and what was logged.
    fn convert(error: CoordinatorError) -> (tonic::Status, String) {
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let status = tracing::subscriber::with_default(subscriber, || tonic::Status::from(error));
        let logged = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        (status, logged)
    }

    /// The incident id of an internal status, if its message is exactly
    /// the sentence clients get.
    fn incident_of(status: &tonic::Status) -> Option<String> {
        let id = status
            .message()
            .strip_prefix("internal error (id ")?
            .strip_suffix("): see the coordinator's log")?;
        (id.len() == 8 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
    }

    #[test]
    fn internal_details_go_to_the_log_and_the_client_gets_an_incident_id() {
        let secret_sql = "SELECT secret_sha256 FROM enrollment_tokens";
        let secret_path = "/var/lib/cairn/catalog.db";
        for error in [
            CoordinatorError::Catalog(sqlx::Error::Protocol(format!(
                "near {secret_sql:?} in {secret_path}"
            ))),
            CoordinatorError::Internal(format!("{secret_sql} failed at {secret_path}")),
            CoordinatorError::io(
                format!("cannot read {secret_path} ({secret_sql})"),
                std::io::Error::other("disk gone"),
            ),
            CoordinatorError::Common(cairn_common::Error::io(
                format!("cannot write {secret_path} ({secret_sql})"),
                std::io::Error::other("disk gone"),
            )),
        ] {
            let shown = error.to_string();
            let (status, logged) = convert(error);
            assert_eq!(status.code(), tonic::Code::Internal, "{shown}");
            let message = status.message();
            assert!(
                !message.contains(secret_path) && !message.contains("secret_sha256"),
                "{message}"
            );
            let incident = incident_of(&status).unwrap_or_else(|| panic!("{message}"));
            assert!(
                logged.contains(&incident) && logged.contains(secret_path),
                "the log names the incident and the whole error: {logged}"
            );
        }
        // Two incidents, two ids.
        let first = convert(CoordinatorError::Internal("a".into())).0;
        let second = convert(CoordinatorError::Internal("a".into())).0;
        assert_ne!(incident_of(&first), incident_of(&second));
    }

    #[test]
    fn errors_meant_for_the_client_keep_their_words() {
        for (error, code) in [
            (
                CoordinatorError::NotFound("no agent named \"db9\": see cairn agents list".into()),
                tonic::Code::NotFound,
            ),
            (
                CoordinatorError::InvalidArgument("--tag: bad".into()),
                tonic::Code::InvalidArgument,
            ),
            (
                CoordinatorError::Conflict("job j1 already ended".into()),
                tonic::Code::FailedPrecondition,
            ),
            (
                CoordinatorError::Common(cairn_common::Error::invalid("agent name", "too long")),
                tonic::Code::InvalidArgument,
            ),
        ] {
            let shown = error.to_string();
            let (status, _) = convert(error);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), shown);
        }
    }
}
