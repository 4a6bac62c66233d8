//! The backup's globals (`pg_dumpall --globals-only`) read as far as roles
//! go: which roles it defines, the statements that define each, and the
//! role memberships; and which roles an archive needs (its owners, and the
//! roles its privileges name).

use std::collections::{BTreeMap, BTreeSet};

use cairn_common::archive::ArchiveHead;

use super::request::Request;
use super::sql::{Token, identifiers, statements};
use super::{RestoreError, State};
use crate::postgres::target::Instance;

/// The roles of a backup's globals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Globals {
    /// Every role the script creates, with the statements that define it
    /// (`CREATE ROLE`, `ALTER ROLE`, `COMMENT ON ROLE`) in script order.
    pub roles: BTreeMap<String, Vec<String>>,
    /// The order in which the script creates the roles.
    pub order: Vec<String>,
    pub memberships: Vec<Membership>,
}

/// `GRANT group TO member ...`, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Membership {
    pub group: String,
    pub member: String,
    pub statement: String,
}

impl Globals {
    /// Reads a `pg_dumpall --globals-only` script. Anything but roles and
    /// memberships (settings, tablespaces) is left out.
    pub fn parse(sql: &str) -> Globals {
        let mut globals = Globals::default();
        for statement in statements(sql) {
            let tokens = &statement.tokens;
            let keyword = |index: usize, keyword: &str| {
                tokens.get(index).is_some_and(|t| t.is_keyword(keyword))
            };
            let name_at = |index: usize| tokens.get(index).and_then(Token::identifier);
            if keyword(0, "create") && keyword(1, "role") {
                if let Some(role) = name_at(2) {
                    if !globals.roles.contains_key(role) {
                        globals.order.push(role.to_string());
                    }
                    globals
                        .roles
                        .entry(role.to_string())
                        .or_default()
                        .push(statement.text.clone());
                }
            } else if (keyword(0, "alter") && keyword(1, "role"))
                || (keyword(0, "comment") && keyword(1, "on") && keyword(2, "role"))
            {
                let index = if keyword(0, "alter") { 2 } else { 3 };
                if let Some(statements) = name_at(index).and_then(|r| globals.roles.get_mut(r)) {
                    statements.push(statement.text.clone());
                }
            } else if keyword(0, "grant")
                && keyword(2, "to")
                && let (Some(group), Some(member)) = (name_at(1), name_at(3))
            {
                globals.memberships.push(Membership {
                    group: group.to_string(),
                    member: member.to_string(),
                    statement: statement.text.clone(),
                });
            }
        }
        globals
    }
}

/// The roles an archive needs on the target: the owners of its entries
/// (unless `no_owner`: then everything is owned by the restoring role) and
/// every role its privileges and policies name. A superset: the words of
/// those statements that are not roles come along; callers keep the names
/// that are roles in the globals.
pub(crate) fn needed_roles(head: &ArchiveHead, no_owner: bool) -> BTreeSet<String> {
    let mut needed = BTreeSet::new();
    if !no_owner {
        needed.extend(head.owners.iter().cloned());
    }
    for entry in &head.entries {
        if matches!(entry.desc.as_str(), "ACL" | "DEFAULT ACL" | "POLICY")
            && let Some(defn) = &entry.defn
        {
            needed.extend(identifiers(defn));
        }
    }
    needed
}

/// What to run to create `missing` roles: their statements in script
/// order, then the memberships whose member is one of them and whose group
/// exists (among `existing` or `missing`). A membership of a role that was
/// already there is left alone: its privileges are the target's business.
pub(crate) fn creation_plan<'a>(
    globals: &'a Globals,
    missing: &BTreeSet<String>,
    existing: &BTreeSet<String>,
) -> (Vec<(&'a str, &'a [String])>, Vec<&'a Membership>) {
    let roles = globals
        .order
        .iter()
        .filter(|role| missing.contains(*role))
        .filter_map(|role| {
            globals
                .roles
                .get(role)
                .map(|statements| (role.as_str(), statements.as_slice()))
        })
        .collect();
    let memberships = globals
        .memberships
        .iter()
        .filter(|m| missing.contains(&m.member))
        .filter(|m| missing.contains(&m.group) || existing.contains(&m.group))
        .collect();
    (roles, memberships)
}

/// Creates the roles the archive needs that the target lacks, from the
/// backup's globals.
pub(super) async fn create_roles(
    request: &Request,
    instance: &Instance,
    state: &mut State,
    globals: Option<&[u8]>,
    head: &ArchiveHead,
) -> Result<(), RestoreError> {
    if request.no_roles {
        return Ok(());
    }
    let Some(globals) = globals else {
        state.warn("the backup holds no globals: no roles were created".into());
        return Ok(());
    };
    let globals = Globals::parse(&String::from_utf8_lossy(globals));
    let needed: BTreeSet<String> = needed_roles(head, request.no_owner)
        .into_iter()
        .filter(|role| globals.roles.contains_key(role))
        .collect();
    if needed.is_empty() {
        return Ok(());
    }
    let mut asked = needed.clone();
    asked.extend(
        globals
            .memberships
            .iter()
            .filter(|m| needed.contains(&m.member))
            .map(|m| m.group.clone()),
    );
    let existing = instance.existing_roles(&asked).await?;
    let missing: BTreeSet<String> = needed.difference(&existing).cloned().collect();
    let (to_create, memberships) = creation_plan(&globals, &missing, &existing);
    for (role, statements) in to_create {
        for (index, statement) in statements.iter().enumerate() {
            let Err(error) = instance.run_globals_statement(statement).await else {
                continue;
            };
            // The statement is not repeated: it may hold a password hash.
            if index == 0 {
                return Err(RestoreError::Refused(format!(
                    "cannot create role {role:?}, which the backup needs: {error}; create it on \
                     instance {}, or pass --no-roles (and --no-owner if it owns objects)",
                    request.instance
                )));
            }
            state.warn(format!(
                "role {role:?} was created, but one of the statements defining it failed: {error}"
            ));
        }
        let stripped = match instance.strip_instance_wide_attributes(role).await {
            Ok(stripped) => stripped,
            Err(error) => {
                // Never leave a copied superuser behind.
                let _ = instance.drop_role(role).await;
                return Err(RestoreError::Refused(format!(
                    "role {role:?} was created but could not be limited to this database's \
                     needs ({error}), so it was dropped again; create it on instance {} by \
                     hand, or pass --no-roles",
                    request.instance
                )));
            }
        };
        if !stripped.is_empty() {
            state.warn(format!(
                "role {role:?} was created without {} it has in the backup: grant {} by hand if \
                 it needs {} on this instance",
                stripped.join(", "),
                if stripped.len() == 1 { "it" } else { "them" },
                if stripped.len() == 1 { "it" } else { "them" },
            ));
        }
        tracing::info!(role, "created a role the backup needs");
        state.report.roles_created.push(role.to_string());
    }
    for membership in memberships {
        // A membership in a superuser or a predefined pg_* role would give
        // back the power the attributes above took away.
        if instance.is_instance_wide_role(&membership.group).await? {
            state.warn(format!(
                "role {:?} was not made a member of {:?}, which has power over the whole \
                 instance: grant it by hand if it needs it here",
                membership.member, membership.group
            ));
            continue;
        }
        if let Err(error) = instance.run_globals_statement(&membership.statement).await {
            state.warn(format!(
                "role {:?} was not made a member of {:?}: {error}",
                membership.member, membership.group
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_common::archive::TocEntry;

    const GLOBALS: &str = r#"--
-- PostgreSQL database cluster dump
--

SET default_transaction_read_only = off;

SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;

--
-- Roles
--

CREATE ROLE alice;
ALTER ROLE alice WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN NOREPLICATION NOBYPASSRLS PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$a;b--c:d''e';
CREATE ROLE "Read ""Only"" ü";
ALTER ROLE "Read ""Only"" ü" WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB NOLOGIN NOREPLICATION NOBYPASSRLS;
COMMENT ON ROLE "Read ""Only"" ü" IS 'readers; all of them
on two lines';
CREATE ROLE postgres;
ALTER ROLE postgres WITH SUPERUSER INHERIT CREATEROLE CREATEDB LOGIN REPLICATION BYPASSRLS;

--
-- User Configurations
--

--
-- User Config "alice"
--

ALTER ROLE alice SET search_path TO E'a\'b;c', "$user";

--
-- Role memberships
--

GRANT "Read ""Only"" ü" TO alice WITH INHERIT TRUE GRANTED BY postgres;
GRANT pg_read_all_stats TO alice GRANTED BY postgres;
GRANT alice TO postgres GRANTED BY postgres;

/* a /* nested */ comment; with a semicolon */
CREATE TABLESPACE fast OWNER postgres LOCATION '/fast';

--
-- PostgreSQL database cluster dump complete
--
"#;

    #[test]
    fn globals_give_each_role_its_statements_as_written() {
        let globals = Globals::parse(GLOBALS);
        assert_eq!(globals.order, ["alice", "Read \"Only\" ü", "postgres"]);
        assert_eq!(
            globals.roles["alice"],
            [
                "CREATE ROLE alice",
                "ALTER ROLE alice WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN \
                 NOREPLICATION NOBYPASSRLS PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$a;b--c:d''e'",
                "ALTER ROLE alice SET search_path TO E'a\\'b;c', \"$user\"",
            ]
        );
        assert_eq!(
            globals.roles["Read \"Only\" ü"],
            [
                "CREATE ROLE \"Read \"\"Only\"\" ü\"",
                "ALTER ROLE \"Read \"\"Only\"\" ü\" WITH NOSUPERUSER INHERIT NOCREATEROLE \
                 NOCREATEDB NOLOGIN NOREPLICATION NOBYPASSRLS",
                "COMMENT ON ROLE \"Read \"\"Only\"\" ü\" IS 'readers; all of them\non two lines'",
            ]
        );
        let memberships: Vec<(&str, &str)> = globals
            .memberships
            .iter()
            .map(|m| (m.group.as_str(), m.member.as_str()))
            .collect();
        assert_eq!(
            memberships,
            [
                ("Read \"Only\" ü", "alice"),
                ("pg_read_all_stats", "alice"),
                ("alice", "postgres")
            ]
        );
        assert_eq!(
            globals.memberships[0].statement,
            "GRANT \"Read \"\"Only\"\" ü\" TO alice WITH INHERIT TRUE GRANTED BY postgres"
        );
    }

    fn entry(dump_id: i64, desc: &str, owner: &str, defn: Option<&str>) -> TocEntry {
        TocEntry {
            dump_id,
            desc: desc.into(),
            namespace: "public".into(),
            tag: format!("t{dump_id}"),
            owner: owner.into(),
            dependencies: Vec::new(),
            defn: defn.map(str::to_string),
            offset_field_at: 0,
        }
    }

    #[test]
    fn needed_roles_are_owners_and_roles_named_by_privileges() {
        let head = ArchiveHead {
            entries: vec![
                entry(1, "TABLE", "app", None),
                entry(
                    2,
                    "ACL",
                    "",
                    Some("GRANT SELECT ON TABLE public.t1 TO \"Read \"\"Only\"\" ü\";"),
                ),
                entry(
                    3,
                    "DEFAULT ACL",
                    "app",
                    Some(
                        "ALTER DEFAULT PRIVILEGES FOR ROLE app GRANT SELECT ON TABLES TO reporting;",
                    ),
                ),
                entry(
                    4,
                    "POLICY",
                    "app",
                    Some("CREATE POLICY p ON public.t1 TO tenant;"),
                ),
                // A table's SQL is not kept, so its words are not looked at.
                entry(5, "TABLE", "app", Some("CREATE TABLE ghost (x int);")),
            ],
            owners: ["app".to_string()].into(),
            ..Default::default()
        };
        let needed = needed_roles(&head, false);
        for role in ["app", "Read \"Only\" ü", "reporting", "tenant"] {
            assert!(needed.contains(role), "{role} in {needed:?}");
        }
        assert!(!needed.contains("ghost"));
        let without_owners = needed_roles(&head, true);
        assert!(without_owners.contains("Read \"Only\" ü"));
        // "app" is still named by the DEFAULT ACL's statement.
        assert!(without_owners.contains("app"));
        let head = ArchiveHead {
            entries: vec![entry(1, "TABLE", "owner_only", None)],
            owners: ["owner_only".to_string()].into(),
            ..Default::default()
        };
        assert!(needed_roles(&head, true).is_empty());
    }

    #[test]
    fn the_plan_creates_missing_roles_in_order_and_only_their_memberships() {
        let globals = Globals::parse(GLOBALS);
        let missing: BTreeSet<String> = ["alice".to_string()].into();
        let existing: BTreeSet<String> = ["postgres".to_string()].into();
        let (roles, memberships) = creation_plan(&globals, &missing, &existing);
        assert_eq!(roles.len(), 1);
        assert_eq!(roles[0].0, "alice");
        assert_eq!(roles[0].1.len(), 3);
        // Not into "Read "Only" ü" (absent), not pg_read_all_stats (not known
        // to exist), not alice TO postgres (postgres was there already).
        assert!(memberships.is_empty(), "{memberships:?}");

        let missing: BTreeSet<String> = ["alice".to_string(), "Read \"Only\" ü".to_string()].into();
        let existing: BTreeSet<String> =
            ["postgres".to_string(), "pg_read_all_stats".to_string()].into();
        let (roles, memberships) = creation_plan(&globals, &missing, &existing);
        assert_eq!(
            roles.iter().map(|(role, _)| *role).collect::<Vec<_>>(),
            ["alice", "Read \"Only\" ü"]
        );
        assert_eq!(
            memberships
                .iter()
                .map(|m| m.group.as_str())
                .collect::<Vec<_>>(),
            ["Read \"Only\" ü", "pg_read_all_stats"]
        );
    }
}
