//! Validated names. Every name that may reach a path, a shell argument, SQL
//! or a certificate goes through one of these newtypes first.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Error;

/// An agent's name: `[a-z0-9][a-z0-9-]{0,62}`. It becomes a certificate
/// subject, a catalog key and a label on metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentName(String);

/// An instance's name inside one agent's config; same alphabet as agents.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InstanceName(String);

/// An operator's name (certificate subject); same alphabet as agents.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OperatorName(String);

const NAME_MAX_LEN: usize = 63;

fn check_name(field: &str, value: &str) -> Result<(), Error> {
    let mut chars = value.chars();
    let valid_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let valid_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if value.len() > NAME_MAX_LEN || !valid_first || !valid_rest {
        return Err(Error::invalid(
            field,
            format!(
                "{value:?} is not a valid name: use 1 to {NAME_MAX_LEN} characters from a-z, 0-9 and '-', starting with a letter or digit (pattern [a-z0-9][a-z0-9-]{{0,62}})"
            ),
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($type:ident, $field:literal) => {
        impl $type {
            pub fn new(value: impl Into<String>) -> Result<Self, Error> {
                let value = value.into();
                check_name($field, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $type {
            type Error = Error;
            fn try_from(value: String) -> Result<Self, Error> {
                Self::new(value)
            }
        }

        impl From<$type> for String {
            fn from(value: $type) -> String {
                value.0
            }
        }

        impl std::str::FromStr for $type {
            type Err = Error;
            fn from_str(value: &str) -> Result<Self, Error> {
                Self::new(value)
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(AgentName, "agent name");
name_type!(InstanceName, "instance name");
name_type!(OperatorName, "operator name");

/// Label keys: `[a-z0-9][a-z0-9_.-]{0,62}`; values: printable, at most 256 bytes.
pub fn validate_label(key: &str, value: &str) -> std::result::Result<(), String> {
    let key_ok = key.len() <= 63
        && key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c));
    if !key_ok {
        return Err(format!(
            "label key {key:?} is invalid: use [a-z0-9][a-z0-9_.-]{{0,62}}"
        ));
    }
    if value.len() > 256 || value.chars().any(char::is_control) {
        return Err(format!(
            "label value for {key:?} is invalid: at most 256 printable characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, valid: bool) {
        assert_eq!(AgentName::new(input).is_ok(), valid, "{input:?}");
    }

    #[test]
    fn agent_names() {
        check("db1", true);
        check("0", true);
        check("a-b-c", true);
        check(&"a".repeat(63), true);
        check(&"a".repeat(64), false);
        check("", false);
        check("-db", false);
        check("DB1", false);
        check("db_1", false);
        check("db 1", false);
        check("db/../x", false);
        check("dé", false);
    }

    #[test]
    fn labels() {
        assert!(validate_label("env", "prod").is_ok());
        assert!(validate_label("app.tier_2-x", "a b").is_ok());
        assert!(validate_label("Env", "prod").is_err());
        assert!(validate_label("env", "a\nb").is_err());
        assert!(validate_label("env", &"x".repeat(257)).is_err());
    }

    #[test]
    fn error_names_the_field_and_the_pattern() {
        let message = AgentName::new("Bad").unwrap_err().to_string();
        assert!(message.contains("agent name"), "{message}");
        assert!(message.contains("[a-z0-9][a-z0-9-]{0,62}"), "{message}");
    }
}
