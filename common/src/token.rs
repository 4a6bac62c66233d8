//! Enrollment tokens.
//!
//! A token is `cairn1.AGENT.ID.SECRET.CAHASH`: the agent name it is bound
//! to, a public id (the catalog key), a 128-bit secret (stored only as a
//! SHA-256 hash), and the SHA-256 of the fleet CA certificate, which the
//! agent checks the coordinator against on first contact (kubeadm's CA-hash
//! discovery). The whole token is a secret: never logged, never printed in
//! JSON output other than `token create`'s own answer.

use crate::Error;
use crate::names::AgentName;

const PREFIX: &str = "cairn1";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 16;

#[derive(Clone, PartialEq, Eq)]
pub struct EnrollmentToken {
    pub agent: AgentName,
    pub id: String,
    secret: String,
    pub ca_sha256: String,
}

impl std::fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollmentToken")
            .field("agent", &self.agent)
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl EnrollmentToken {
    /// A new token with a random id and secret.
    pub fn generate(agent: AgentName, ca_sha256: String) -> Result<EnrollmentToken, Error> {
        Ok(EnrollmentToken {
            agent,
            id: random_hex(ID_BYTES)?,
            secret: random_hex(SECRET_BYTES)?,
            ca_sha256,
        })
    }

    pub fn parse(text: &str) -> Result<EnrollmentToken, Error> {
        let invalid = || {
            Error::invalid(
                "token",
                "not a cairn enrollment token: copy the whole line printed by `cairn token create`",
            )
        };
        let parts: Vec<&str> = text.trim().split('.').collect();
        let [prefix, agent, id, secret, ca_sha256] = parts.as_slice() else {
            return Err(invalid());
        };
        let is_hex =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if *prefix != PREFIX
            || !is_hex(id, ID_BYTES * 2)
            || !is_hex(secret, SECRET_BYTES * 2)
            || !is_hex(ca_sha256, 64)
        {
            return Err(invalid());
        }
        Ok(EnrollmentToken {
            agent: AgentName::new(*agent)?,
            id: id.to_ascii_lowercase(),
            secret: secret.to_ascii_lowercase(),
            ca_sha256: ca_sha256.to_ascii_lowercase(),
        })
    }

    /// The whole token, as the operator copies it. Secret.
    pub fn expose(&self) -> String {
        format!(
            "{PREFIX}.{}.{}.{}.{}",
            self.agent, self.id, self.secret, self.ca_sha256
        )
    }

    /// What the catalog stores instead of the secret.
    pub fn secret_sha256(&self) -> String {
        hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            self.secret.as_bytes(),
        ))
    }
}

fn random_hex(len: usize) -> Result<String, Error> {
    Ok(hex::encode(crate::pki::random_bytes(len)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_redaction() {
        let token =
            EnrollmentToken::generate(AgentName::new("db1").unwrap(), "ab".repeat(32)).unwrap();
        let text = token.expose();
        assert_eq!(EnrollmentToken::parse(&text).unwrap(), token);
        assert!(!format!("{token:?}").contains(&token.secret));
        assert_ne!(token.secret_sha256(), token.secret);
    }

    fn check_rejected(text: &str) {
        assert!(EnrollmentToken::parse(text).is_err(), "{text}");
    }

    #[test]
    fn malformed_tokens() {
        let good = EnrollmentToken::generate(AgentName::new("db1").unwrap(), "ab".repeat(32))
            .unwrap()
            .expose();
        check_rejected("");
        check_rejected(&good.replace("cairn1", "cairn2"));
        check_rejected(&good.replace("db1", "DB1"));
        check_rejected(&format!("{good}.x"));
        check_rejected(&good[..good.len() - 1]);
    }
}
