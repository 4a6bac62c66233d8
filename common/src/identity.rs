//! Who is calling: the identity a fleet certificate carries.
//!
//! A certificate names its holder in a subject-alternative-name URI, which
//! the fleet CA writes and nothing else can forge:
//! `urn:cairn:agent:NAME` or `urn:cairn:operator:ROLE:NAME`. A certificate
//! without such a URI (the coordinator's own server certificate, say) is no
//! identity at all.

use std::fmt;

use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::Error;
use crate::names::{AgentName, OperatorName};

/// An operator's role. Ordered: each role can do everything the lower ones can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads the fleet, the catalog and the audit log; changes nothing.
    Viewer,
    /// Also runs work: probes now, backups and restores later.
    Operator,
    /// Also manages identity: tokens, revocation, operator certificates.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = Error;
    fn from_str(value: &str) -> Result<Self, Error> {
        match value {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(Error::invalid(
                "role",
                format!("{other:?} is not a role: use viewer, operator or admin"),
            )),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The holder of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Agent(AgentName),
    Operator { name: OperatorName, role: Role },
}

impl Principal {
    /// The SAN URI that encodes this principal in a certificate.
    pub fn to_uri(&self) -> String {
        match self {
            Principal::Agent(name) => format!("urn:cairn:agent:{name}"),
            Principal::Operator { name, role } => format!("urn:cairn:operator:{role}:{name}"),
        }
    }

    pub fn from_uri(uri: &str) -> Option<Principal> {
        let rest = uri.strip_prefix("urn:cairn:")?;
        if let Some(name) = rest.strip_prefix("agent:") {
            return AgentName::new(name).ok().map(Principal::Agent);
        }
        let rest = rest.strip_prefix("operator:")?;
        let (role, name) = rest.split_once(':')?;
        Some(Principal::Operator {
            name: OperatorName::new(name).ok()?,
            role: role.parse().ok()?,
        })
    }

    /// The common name written into the certificate subject, for humans.
    pub fn common_name(&self) -> &str {
        match self {
            Principal::Agent(name) => name.as_str(),
            Principal::Operator { name, .. } => name.as_str(),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Agent(name) => write!(f, "agent:{name}"),
            Principal::Operator { name, role } => write!(f, "operator:{name}({role})"),
        }
    }
}

/// A principal together with the certificate that proved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub principal: Principal,
    /// The certificate's serial as lower-case hex of its DER INTEGER bytes.
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_after_unix: i64,
}

impl Identity {
    /// Reads the identity out of a DER certificate. The caller must already
    /// have verified the certificate's chain to the fleet CA.
    pub fn from_certificate_der(der: &[u8]) -> Result<Identity, Error> {
        let certificate = parse_certificate(der)?;
        let principal = certificate_principal(&certificate).ok_or_else(|| {
            Error::Certificate("certificate carries no cairn identity (urn:cairn:...)".into())
        })?;
        Ok(Identity {
            principal,
            serial: hex::encode(certificate.raw_serial()),
            not_after_unix: certificate.validity().not_after.timestamp(),
        })
    }
}

/// A DER certificate's validity window, `(not_before, not_after)` in
/// seconds since the Unix epoch.
pub fn certificate_validity(der: &[u8]) -> Result<(i64, i64), Error> {
    let certificate = parse_certificate(der)?;
    let validity = certificate.validity();
    Ok((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// The serial of a DER certificate as lower-case hex of its DER INTEGER
/// bytes: the one form serials are compared in.
pub fn certificate_serial(der: &[u8]) -> Result<String, Error> {
    Ok(hex::encode(parse_certificate(der)?.raw_serial()))
}

fn parse_certificate(der: &[u8]) -> Result<X509Certificate<'_>, Error> {
    X509Certificate::from_der(der)
        .map(|(_, certificate)| certificate)
        .map_err(|e| Error::Certificate(format!("cannot parse certificate: {e}")))
}

fn certificate_principal(certificate: &X509Certificate<'_>) -> Option<Principal> {
    let san = certificate.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => Principal::from_uri(uri),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(uri: &str, expected: Option<&str>) {
        let parsed = Principal::from_uri(uri);
        assert_eq!(
            parsed.as_ref().map(|p| p.to_string()).as_deref(),
            expected,
            "{uri}"
        );
        if let Some(principal) = parsed {
            assert_eq!(principal.to_uri(), uri);
        }
    }

    #[test]
    fn principal_uris() {
        check("urn:cairn:agent:db1", Some("agent:db1"));
        check(
            "urn:cairn:operator:admin:alice",
            Some("operator:alice(admin)"),
        );
        check(
            "urn:cairn:operator:viewer:bob",
            Some("operator:bob(viewer)"),
        );
        check("urn:cairn:operator:root:bob", None);
        check("urn:cairn:agent:DB1", None);
        check("urn:other:agent:db1", None);
        check("urn:cairn:operator:admin", None);
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
    }
}
