//! The one error type at `cairn-common`'s boundary.
//!
//! The rule for every error type in Cairn: a variant that wraps a cause
//! puts the cause's text into its own message and does not also expose it
//! as `source()`. The binaries print errors with anyhow's `{:#}`, which
//! appends every `source()`; a cause that is both would be printed twice.
//! Self-contained messages also keep `to_string()` (gRPC statuses, logs)
//! complete.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration file could not be read or parsed; names the file and key path.
    #[error("{file}: {message}")]
    Config { file: PathBuf, message: String },
    /// A value failed validation; names the field and says what is allowed.
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// A protocol message was missing a field or carried a bad one.
    #[error("protocol: field `{field}`: {reason}")]
    Protocol { field: &'static str, reason: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("certificate: {0}")]
    Certificate(String),
    /// The cause's text is part of the message and not exposed as
    /// `source()`, so a printed chain (`{:#}`) names it once.
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },
    #[error("cannot connect to the coordinator at {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The TLS handshake completed on our side, then the coordinator sent
    /// an alert or closed: it refused this certificate (or a limit).
    #[error("the coordinator at {url} refused the connection: {reason}")]
    Refused {
        url: String,
        reason: String,
        revoked: bool,
    },
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            cause: source,
        }
    }

    pub fn protocol(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Protocol {
            field,
            reason: reason.into(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        match &error {
            Error::Invalid { .. } | Error::Protocol { .. } => {
                tonic::Status::invalid_argument(error.to_string())
            }
            Error::Certificate(_) => tonic::Status::invalid_argument(error.to_string()),
            _ => internal_status(&error),
        }
    }
}

/// A failure on the server's side, as a client may see it: the full error
/// (SQL, file paths, a storage service's words) goes to the log under a
/// short random incident id, and the client gets only that id and where
/// to look, with `code`. The id lets an operator find the log line.
pub fn incident_status(code: tonic::Code, error: &dyn std::fmt::Display) -> tonic::Status {
    let incident = incident_id();
    tracing::error!(incident = %incident, error = %error, "internal error");
    tonic::Status::new(
        code,
        format!("internal error (id {incident}): see the coordinator's log"),
    )
}

/// [`incident_status`] as `INTERNAL`.
pub fn internal_status(error: &dyn std::fmt::Display) -> tonic::Status {
    incident_status(tonic::Code::Internal, error)
}

/// 8 hex digits, random; the clock's nanoseconds if the system random
/// source fails (an id only has to tell incidents apart in one log).
fn incident_id() -> String {
    match crate::pki::random_bytes(4) {
        Ok(bytes) => hex::encode(bytes),
        Err(_) => format!(
            "{:08x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.subsec_nanos())
                .unwrap_or_default()
        ),
    }
}
