//! The backup's globals (`pg_dumpall --globals-only`) read as far as roles
//! go: which roles it defines, the statements that define each, and the
//! role memberships; and which roles an archive needs (its owners, and the
//! roles its privileges name).
//!
//! The globals come from another host, so they are filtered as they are
//! read, before anything runs: a role's statements lose the instance-wide
//! attributes (`SUPERUSER` becomes `NOSUPERUSER`, and so on) and every
//! clause that would make it a member of a role or a role a member of it
//! (`IN ROLE`, `IN GROUP`, `ROLE`, `USER`, `ADMIN`), attributes written as
//! quoted identifiers included; renames and the settings that load code or
//! change identity at login (`session_preload_libraries`, `role`, ...) are
//! withheld whole; memberships in predefined (`pg_*`) roles and in roles
//! that are superusers in the backup are withheld. Nothing grants that
//! power on the target, not even for a moment before a later check takes it
//! back.
//!
//! This is about the globals only: the archive's own entries (functions,
//! triggers, ...) run as the restoring role, so restoring a backup means
//! trusting the host it came from with the target database's contents.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use cairn_common::archive::ArchiveHead;

use super::request::Request;
use super::sql::{Statement, Token, identifiers, statements};
use super::{RestoreError, State};
use crate::postgres::target::Instance;

/// The roles of a backup's globals, filtered (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Globals {
    /// Every role the script creates, with the statements that define it
    /// (`CREATE ROLE`, `ALTER ROLE`, `COMMENT ON ROLE`) in script order,
    /// each as written but for what the filter took out.
    pub roles: BTreeMap<String, Vec<String>>,
    /// The order in which the script creates the roles.
    pub order: Vec<String>,
    /// What the filter took out of each role's statements, as written
    /// there (`SUPERUSER`, `IN ROLE pg_read_server_files`).
    pub withheld: BTreeMap<String, Vec<String>>,
    /// The memberships a restore may grant.
    pub memberships: Vec<Membership>,
    /// The memberships no restore grants, and why.
    pub withheld_memberships: Vec<(Membership, &'static str)>,
}

/// Attributes that give power over the whole instance: a copied role never
/// has them, not even between two statements.
const INSTANCE_WIDE_ATTRIBUTES: [&str; 4] = ["superuser", "replication", "bypassrls", "createrole"];

/// Settings `ALTER ROLE ... SET` may not give a copied role: they load a
/// library into its sessions or change who its sessions are.
const WITHHELD_SETTINGS: [&str; 4] = [
    "session_preload_libraries",
    "local_preload_libraries",
    "role",
    "session_authorization",
];

/// Bare words `ALTER ROLE` reads as another role than the one so named
/// (the restoring session's own role, or every role).
const NOT_A_NAMED_ROLE: [&str; 5] = [
    "current_user",
    "current_role",
    "session_user",
    "all",
    "public",
];

/// A role statement's options from token `from` on, filtered: each
/// instance-wide attribute turned into its `NO` form, and the clauses that
/// grant memberships (`IN ROLE`, `IN GROUP`, `ROLE`, `USER`, `ADMIN`, each
/// with its list of roles) and `SYSID` cut out. Returns the statement's new
/// text and what was taken out, as written.
fn filter_role_options(statement: &Statement, from: usize) -> (String, Vec<String>) {
    let Statement {
        text,
        tokens,
        spans,
    } = statement;
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    let mut withheld = Vec::new();
    let mut index = from;
    while let Some(token) = tokens.get(index) {
        // PostgreSQL reads an attribute written as a quoted identifier
        // (`"superuser"`) like the bare word.
        if let Token::Quoted(quoted) = token
            && INSTANCE_WIDE_ATTRIBUTES.contains(&quoted.to_lowercase().as_str())
        {
            edits.push((spans[index].clone(), format!("NO{}", quoted.to_uppercase())));
            withheld.push(quoted.to_uppercase());
            index += 1;
            continue;
        }
        let Token::Word(word) = token else {
            index += 1;
            continue;
        };
        if INSTANCE_WIDE_ATTRIBUTES.contains(&word.as_str()) {
            edits.push((spans[index].clone(), format!("NO{}", word.to_uppercase())));
            withheld.push(word.to_uppercase());
            index += 1;
            continue;
        }
        let keyword =
            |at: usize, keyword: &str| tokens.get(at).is_some_and(|t| t.is_keyword(keyword));
        // The clause's first token past its keywords, and whether a list
        // of roles follows (or a number: SYSID).
        let clause = match word.as_str() {
            "in" if keyword(index + 1, "role") || keyword(index + 1, "group") => {
                Some((index + 2, true))
            }
            "role" | "user" | "admin" => Some((index + 1, true)),
            "sysid" => Some((index + 1, false)),
            _ => None,
        };
        let Some((mut end, roles)) = clause else {
            index += 1;
            continue;
        };
        if roles {
            // role [, role]...
            while tokens.get(end).and_then(Token::identifier).is_some() {
                end += 1;
                if tokens.get(end) != Some(&Token::Symbol(',')) {
                    break;
                }
                end += 1;
            }
        } else {
            while matches!(tokens.get(end), Some(Token::Symbol(c)) if c.is_ascii_digit() || *c == '-')
            {
                end += 1;
            }
        }
        // `end` is the first token past the clause; the cut takes the
        // blanks before it too.
        let cut_to = spans.get(end).map_or(text.len(), |span| span.start);
        withheld.push(text[spans[index].start..spans[end - 1].end].to_string());
        edits.push((spans[index].start..cut_to, String::new()));
        index = end;
    }
    let mut filtered = String::with_capacity(text.len());
    let mut at = 0;
    for (range, replacement) in edits {
        filtered.push_str(&text[at..range.start]);
        filtered.push_str(&replacement);
        at = range.end;
    }
    filtered.push_str(&text[at..]);
    (filtered.trim_end().to_string(), withheld)
}

/// `GRANT group TO member ...`, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Membership {
    pub group: String,
    pub member: String,
    pub statement: String,
}

impl Globals {
    /// Reads a `pg_dumpall --globals-only` script, filtering as it goes
    /// (see the module doc). Anything but roles and memberships (settings,
    /// tablespaces) is left out.
    pub fn parse(sql: &str) -> Globals {
        let mut globals = Globals::default();
        let mut superusers = BTreeSet::new();
        let mut grants = Vec::new();
        for statement in statements(sql) {
            let tokens = &statement.tokens;
            let keyword = |index: usize, keyword: &str| {
                tokens.get(index).is_some_and(|t| t.is_keyword(keyword))
            };
            let name_at = |index: usize| tokens.get(index).and_then(Token::identifier);
            let (role, text, withheld) = if keyword(0, "create") && keyword(1, "role") {
                let Some(role) = name_at(2) else { continue };
                if !globals.roles.contains_key(role) {
                    globals.order.push(role.to_string());
                    globals.roles.insert(role.to_string(), Vec::new());
                }
                let (text, withheld) = filter_role_options(&statement, 3);
                (role, text, withheld)
            } else if keyword(0, "alter") && keyword(1, "role") {
                let Some(role) = name_at(2).filter(|_| {
                    !matches!(&tokens[2], Token::Word(word) if NOT_A_NAMED_ROLE.contains(&word.as_str()))
                }) else {
                    continue;
                };
                // A rename would move the role out from under the checks
                // that follow its creation (they look it up by name), and
                // a setting that loads code or changes identity at login
                // is power over the instance: both are withheld whole.
                let setting = if keyword(3, "set") {
                    name_at(4)
                } else if keyword(3, "in") && keyword(6, "set") {
                    name_at(7)
                } else {
                    None
                };
                if keyword(3, "rename")
                    || setting.is_some_and(|name| {
                        WITHHELD_SETTINGS.contains(&name.to_lowercase().as_str())
                    })
                {
                    let role_withheld = globals.withheld.entry(role.to_string()).or_default();
                    role_withheld.push(statement.text.clone());
                    continue;
                }
                // `SET`, `RESET` and `IN DATABASE ... SET` take no role
                // options (and `SET role ...` names a setting).
                let options = !(keyword(3, "set") || keyword(3, "reset") || keyword(3, "in"));
                let (text, withheld) = if options {
                    filter_role_options(&statement, 3)
                } else {
                    (statement.text.clone(), Vec::new())
                };
                (role, text, withheld)
            } else if keyword(0, "comment") && keyword(1, "on") && keyword(2, "role") {
                let Some(role) = name_at(3) else { continue };
                (role, statement.text.clone(), Vec::new())
            } else {
                if keyword(0, "grant") {
                    grants.push(statement);
                }
                continue;
            };
            let Some(statements) = globals.roles.get_mut(role) else {
                continue;
            };
            statements.push(text);
            if withheld.iter().any(|w| w == "SUPERUSER") {
                superusers.insert(role.to_string());
            }
            let role_withheld = globals.withheld.entry(role.to_string()).or_default();
            for item in withheld {
                if !role_withheld.contains(&item) {
                    role_withheld.push(item);
                }
            }
        }
        globals.withheld.retain(|_, withheld| !withheld.is_empty());
        for statement in grants {
            let tokens = &statement.tokens;
            let keyword = |index: usize, keyword: &str| {
                tokens.get(index).is_some_and(|t| t.is_keyword(keyword))
            };
            let name_at = |index: usize| tokens.get(index).and_then(Token::identifier);
            // `GRANT group TO member`, then only its options (`WITH ...`,
            // `GRANTED BY ...`): never a list of groups or of members.
            let (Some(group), true, Some(member)) = (name_at(1), keyword(2, "to"), name_at(3))
            else {
                continue;
            };
            let membership = Membership {
                group: group.to_string(),
                member: member.to_string(),
                statement: statement.text.clone(),
            };
            let why_not = if !(tokens.len() == 4 || keyword(4, "with") || keyword(4, "granted")) {
                Some("the statement does more than grant one role to one role")
            } else if group.starts_with("pg_") || superusers.contains(group) {
                Some("it has power over the whole instance")
            } else {
                None
            };
            match why_not {
                Some(reason) => globals.withheld_memberships.push((membership, reason)),
                None => globals.memberships.push(membership),
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
        // A second line of defence: the filter above already turned these
        // attributes off in the statements that ran.
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
        let mut withheld = globals.withheld.get(role).cloned().unwrap_or_default();
        for attribute in stripped {
            if !withheld.iter().any(|w| w == attribute) {
                withheld.push(attribute.to_string());
            }
        }
        if !withheld.is_empty() {
            state.warn(format!(
                "role {role:?} was created without {} it has in the backup: grant {} by hand if \
                 it needs {} on this instance",
                withheld.join(", "),
                if withheld.len() == 1 { "it" } else { "them" },
                if withheld.len() == 1 { "it" } else { "them" },
            ));
        }
        tracing::info!(role, "created a role the backup needs");
        state.report.roles_created.push(role.to_string());
    }
    for (membership, why_not) in &globals.withheld_memberships {
        if missing.contains(&membership.member) {
            state.warn(format!(
                "role {:?} was not made a member of {:?}: {why_not}; grant it by hand if it \
                 needs it here",
                membership.member, membership.group
            ));
        }
    }
    for membership in memberships {
        // A membership in a superuser or a predefined pg_* role would give
        // back the power the attributes above took away (the filter
        // withheld those the backup knows of; this is the target's view).
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
            [("Read \"Only\" ü", "alice"), ("alice", "postgres")]
        );
        // postgres is a superuser in the backup: it keeps its statements,
        // without the attributes.
        assert_eq!(
            globals.roles["postgres"][1],
            "ALTER ROLE postgres WITH NOSUPERUSER INHERIT NOCREATEROLE CREATEDB LOGIN \
             NOREPLICATION NOBYPASSRLS"
        );
        assert_eq!(
            globals.withheld["postgres"],
            ["SUPERUSER", "CREATEROLE", "REPLICATION", "BYPASSRLS"]
        );
        assert!(!globals.withheld.contains_key("alice"));
        assert_eq!(
            globals
                .withheld_memberships
                .iter()
                .map(|(m, _)| (m.group.as_str(), m.member.as_str()))
                .collect::<Vec<_>>(),
            [("pg_read_all_stats", "alice")]
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
        // Never pg_read_all_stats: the filter withheld it.
        assert_eq!(
            memberships
                .iter()
                .map(|m| m.group.as_str())
                .collect::<Vec<_>>(),
            ["Read \"Only\" ü"]
        );
    }

    /// Globals no `pg_dumpall` writes, as a hostile source host could.
    const HOSTILE: &str = r#"
CREATE ROLE evil IN ROLE pg_execute_server_program, "pg_read_server_files" ROLE victim ADMIN boss SUPERUSER LOGIN PASSWORD 'role admin';
CREATE ROLE sneaky WITH SYSID 42 IN GROUP boss USER victim, other BYPASSRLS;
ALTER ROLE evil WITH REPLICATION CREATEROLE CONNECTION LIMIT 5 VALID UNTIL 'infinity';
ALTER ROLE evil SET role TO 'boss';
CREATE ROLE boss;
ALTER ROLE boss WITH SUPERUSER;
ALTER ROLE current_user WITH NOSUPERUSER;
CREATE ROLE "current_user";
ALTER ROLE current_user WITH NOSUPERUSER;
ALTER ROLE CURRENT_ROLE NOINHERIT;
GRANT boss TO evil GRANTED BY postgres;
GRANT pg_execute_server_program TO evil;
GRANT "pg_write_server_files" TO sneaky WITH ADMIN OPTION;
GRANT app TO evil, victim;
GRANT app TO sneaky WITH INHERIT TRUE GRANTED BY postgres;
"#;

    /// What runs for each role, and what was withheld.
    fn check_role(globals: &Globals, role: &str, statements: &[&str], withheld: &[&str]) {
        assert_eq!(globals.roles[role], statements, "{role}");
        assert_eq!(
            globals.withheld.get(role).cloned().unwrap_or_default(),
            withheld,
            "{role}"
        );
    }

    #[test]
    fn membership_clauses_and_instance_wide_attributes_are_removed_before_anything_runs() {
        let globals = Globals::parse(HOSTILE);
        check_role(
            &globals,
            "evil",
            &[
                "CREATE ROLE evil NOSUPERUSER LOGIN PASSWORD 'role admin'",
                "ALTER ROLE evil WITH NOREPLICATION NOCREATEROLE CONNECTION LIMIT 5 VALID UNTIL \
                 'infinity'",
            ],
            &[
                "IN ROLE pg_execute_server_program, \"pg_read_server_files\"",
                "ROLE victim",
                "ADMIN boss",
                "SUPERUSER",
                "REPLICATION",
                "CREATEROLE",
                // A setting named role: the role its sessions become.
                "ALTER ROLE evil SET role TO 'boss'",
            ],
        );
        check_role(
            &globals,
            "sneaky",
            &["CREATE ROLE sneaky WITH NOBYPASSRLS"],
            &[
                "SYSID 42",
                "IN GROUP boss",
                "USER victim, other",
                "BYPASSRLS",
            ],
        );
        check_role(
            &globals,
            "boss",
            &["CREATE ROLE boss", "ALTER ROLE boss WITH NOSUPERUSER"],
            &["SUPERUSER"],
        );
        // An unquoted current_user is the restoring session's role, not
        // the role "current_user" of the script.
        check_role(
            &globals,
            "current_user",
            &["CREATE ROLE \"current_user\""],
            &[],
        );
        for statements in globals.roles.values() {
            for statement in statements {
                let words = identifiers(statement);
                for forbidden in [
                    "superuser",
                    "replication",
                    "bypassrls",
                    "createrole",
                    "admin",
                    "sysid",
                    "victim",
                    "pg_execute_server_program",
                    "pg_read_server_files",
                ] {
                    assert!(!words.contains(forbidden), "{forbidden} in {statement}");
                }
            }
        }

        let memberships: Vec<(&str, &str)> = globals
            .memberships
            .iter()
            .map(|m| (m.group.as_str(), m.member.as_str()))
            .collect();
        assert_eq!(memberships, [("app", "sneaky")]);
        let withheld: Vec<(&str, &str, &str)> = globals
            .withheld_memberships
            .iter()
            .map(|(m, why)| (m.group.as_str(), m.member.as_str(), *why))
            .collect();
        let whole_instance = "it has power over the whole instance";
        assert_eq!(
            withheld,
            [
                // boss is a superuser in the backup.
                ("boss", "evil", whole_instance),
                ("pg_execute_server_program", "evil", whole_instance),
                ("pg_write_server_files", "sneaky", whole_instance),
                (
                    "app",
                    "evil",
                    "the statement does more than grant one role to one role"
                ),
            ]
        );

        // The plan for the roles a restore would create runs none of them.
        let missing: BTreeSet<String> = ["evil", "sneaky", "boss"].map(String::from).into();
        let existing: BTreeSet<String> =
            ["app", "pg_execute_server_program", "pg_write_server_files"]
                .map(String::from)
                .into();
        let (_, planned) = creation_plan(&globals, &missing, &existing);
        assert_eq!(
            planned
                .iter()
                .map(|m| m.statement.as_str())
                .collect::<Vec<_>>(),
            ["GRANT app TO sneaky WITH INHERIT TRUE GRANTED BY postgres"]
        );
    }

    #[test]
    fn quoted_attributes_renames_and_login_settings_are_withheld() {
        let globals = Globals::parse(
            "CREATE ROLE evil \"superuser\" LOGIN PASSWORD 'x';\n\
             ALTER ROLE evil WITH \"replication\";\n\
             ALTER ROLE evil RENAME TO evil2;\n\
             ALTER ROLE evil SET session_preload_libraries = '/tmp/evil.so';\n\
             ALTER ROLE evil IN DATABASE shop SET role = 'postgres';\n\
             ALTER ROLE evil SET search_path = app;\n",
        );
        assert_eq!(
            globals.roles["evil"],
            [
                "CREATE ROLE evil NOSUPERUSER LOGIN PASSWORD 'x'",
                "ALTER ROLE evil WITH NOREPLICATION",
                "ALTER ROLE evil SET search_path = app",
            ]
        );
        let withheld = &globals.withheld["evil"];
        for expected in [
            "SUPERUSER",
            "REPLICATION",
            "ALTER ROLE evil RENAME TO evil2",
            "session_preload_libraries",
            "SET role",
        ] {
            assert!(
                withheld.iter().any(|w| w.contains(expected)),
                "{expected} not withheld: {withheld:?}"
            );
        }
    }
}
