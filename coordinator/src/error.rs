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
            other => {
                // Internal details go to the log, where they are handled.
                tracing::error!(error = %other, "internal error");
                Status::internal(format!("internal error: {other}"))
            }
        }
    }
}
