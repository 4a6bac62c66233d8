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

/// A schedule's name (`cairn schedule create NAME`); same alphabet as
/// agents.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ScheduleName(String);

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
name_type!(ScheduleName, "schedule name");

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

/// Reads repeated `--FLAG key=value` arguments (`cairn backup run --tag`,
/// `cairn-agent enroll --label`) into a map. A key given twice is refused,
/// naming it, rather than the last value silently winning; `example` is a
/// valid argument to show in the error.
pub fn parse_key_values(
    flag: &str,
    example: &str,
    items: &[String],
) -> std::result::Result<std::collections::BTreeMap<String, String>, String> {
    let mut parsed = std::collections::BTreeMap::new();
    for item in items {
        let (key, value) = item.split_once('=').ok_or_else(|| {
            format!("{flag} {item:?}: use key=value, for example {flag} {example}")
        })?;
        validate_label(key, value).map_err(|e| format!("{flag}: {e}"))?;
        if let Some(first) = parsed.insert(key.to_string(), value.to_string()) {
            return Err(format!(
                "{flag} {key} is given twice ({key}={first} and {key}={value}): give each key once"
            ));
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_refuse_a_repeated_key_by_name() {
        let items = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let parsed = parse_key_values("--tag", "ticket=OPS-12", &items(&["a=1", "b=x=y"])).unwrap();
        assert_eq!(parsed.get("b").map(String::as_str), Some("x=y"));
        let twice =
            parse_key_values("--tag", "ticket=OPS-12", &items(&["k=a", "k=b"])).unwrap_err();
        assert!(twice.contains("--tag k is given twice"), "{twice}");
        let bare = parse_key_values("--label", "env=prod", &items(&["env"])).unwrap_err();
        assert!(bare.contains("for example --label env=prod"), "{bare}");
    }

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

/// PostgreSQL's identifier limit (NAMEDATALEN - 1), in bytes.
pub const IDENTIFIER_MAX_BYTES: usize = 63;

/// Splits `text` into dot-separated identifiers, each bare (taken as
/// written: no case folding) or double-quoted (with `""` for a quote, so a
/// name may hold dots). Every part is 1 to 63 bytes with no NUL.
fn split_identifiers(text: &str) -> std::result::Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err("an unterminated quoted name".into()),
                }
            }
            if !matches!(chars.peek(), None | Some('.')) {
                return Err("text after a quoted name".into());
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if c == '"' {
                    return Err("a quote inside a bare name (quote the whole name)".into());
                }
                part.push(c);
                chars.next();
            }
        }
        if part.is_empty() || part.len() > IDENTIFIER_MAX_BYTES || part.contains('\0') {
            return Err(format!(
                "each name has 1 to {IDENTIFIER_MAX_BYTES} bytes and no NUL"
            ));
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some(_) => continue, // the dot
        }
    }
}

/// `SCHEMA.TABLE` as given to `--table`: two names, see
/// [`split_identifiers`]. Returns (schema, table).
pub fn parse_qualified_table(text: &str) -> std::result::Result<(String, String), String> {
    match split_identifiers(text)?.as_slice() {
        [schema, table] => Ok((schema.clone(), table.clone())),
        _ => Err(format!(
            "{text:?} is not SCHEMA.TABLE (like public.orders; quote a name that holds a dot: \"my.schema\".orders)"
        )),
    }
}

/// A schema name as given to `--schema`: one name, bare or quoted.
pub fn parse_schema_name(text: &str) -> std::result::Result<String, String> {
    match split_identifiers(text)?.as_slice() {
        [schema] => Ok(schema.clone()),
        _ => Err(format!(
            "{text:?} is not one schema name (quote a name that holds a dot)"
        )),
    }
}

#[cfg(test)]
mod qualified_name_tests {
    use super::*;

    #[test]
    fn tables_and_schemas_parse_with_quotes_dots_and_unicode() {
        assert_eq!(
            parse_qualified_table("public.orders").unwrap(),
            ("public".into(), "orders".into())
        );
        assert_eq!(
            parse_qualified_table("\"my.schema\".\"Ünï \"\"q\"\"\"").unwrap(),
            ("my.schema".into(), "Ünï \"q\"".into())
        );
        assert_eq!(
            parse_qualified_table("Sales.Orders").unwrap(),
            ("Sales".into(), "Orders".into())
        );
        for bad in [
            "orders", "a.b.c", "a.", ".b", "\"a.b", "a\"b\".c", "\"a\"x.b",
        ] {
            assert!(parse_qualified_table(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(parse_schema_name("\"a.b\"").unwrap(), "a.b");
        assert!(parse_schema_name("a.b").is_err());
        assert!(parse_schema_name(&"x".repeat(64)).is_err());
    }
}
