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
    #[error("catalog: {0}")]
    Catalog(#[from] sqlx::Error),
    #[error("catalog migration: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Common(#[from] cairn_common::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl CoordinatorError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CoordinatorError::Io {
            context: context.into(),
            source,
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
