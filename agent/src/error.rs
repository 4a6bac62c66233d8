//! The one error type at the agent library's boundary.

use crate::postgres::PostgresError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Common(#[from] cairn_common::Error),
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    /// The coordinator refused enrollment; its reason says what to do.
    #[error("enrollment refused: {0}")]
    EnrollmentRefused(String),
    #[error("cannot reach the coordinator at {url}: {reason}")]
    CoordinatorUnreachable { url: String, reason: String },
    /// The coordinator refused this agent's certificate as revoked. Only a
    /// new enrollment helps; retrying does not.
    #[error(
        "the coordinator at {url} refused this agent's certificate as revoked ({reason}): this host must be re-enrolled (on the coordinator: cairn token create --agent NAME; here: cairn-agent enroll into a new --dir)"
    )]
    Revoked { url: String, reason: String },
    /// The coordinator did not renew this agent's certificate (or could
    /// not be asked); the agent retries until the certificate expires.
    #[error("certificate renewal failed ({code}): {reason}")]
    RenewalRefused { code: String, reason: String },
    #[error("the coordinator broke the protocol: {0}")]
    Protocol(String),
    /// The cause is in the message only (see `cairn_common::error`).
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl AgentError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io {
            context: context.into(),
            cause: source,
        }
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;
