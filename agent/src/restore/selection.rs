//! Which entries of an archive a partial restore (`--table`, `--schema`)
//! restores, as a `pg_restore --use-list` file.
//!
//! A table brings its definition, its data, and what hangs on it alone:
//! indexes, constraints, triggers, column defaults, comments, privileges,
//! rules, policies, and the sequences it owns (with their values). An
//! entry that also depends on a table that is not restored (another
//! table's default using this table's sequence) is left out: restoring one
//! table never alters another, with one exception, foreign keys:
//!
//! - the table's own foreign keys come with it (the tables they point at
//!   must be on the target, or restored too, or the restore fails);
//! - the foreign keys of other tables that point at it
//!   ([`Selection::incoming`]) are restored too, which `pg_restore --clean`
//!   turns into: dropped before the table is, added again after it (and
//!   checked against its restored rows), in the same single transaction.
//!   The caller keeps only those the target has (`without`), and refuses
//!   a target with others ([`super::checks`]).
//!
//! A schema brings every entry in it, and the schema itself (with its
//! comment and privileges) when the target lacks it.
//!
//! The list keeps the archive's order: `pg_restore` restores in list order,
//! and an archive read from a pipe cannot be read backwards.

use std::collections::{BTreeSet, HashMap, HashSet};

use cairn_common::archive::{ArchiveHead, TocEntry};

/// Entries that come with a selected table when they depend on it.
const FOLLOWS_ITS_TABLE: &[&str] = &[
    "TABLE DATA",
    "INDEX",
    "INDEX ATTACH",
    "CONSTRAINT",
    "CHECK CONSTRAINT",
    "TRIGGER",
    "DEFAULT",
    "COMMENT",
    "ACL",
    "SECURITY LABEL",
    "SEQUENCE",
    "SEQUENCE OWNED BY",
    "SEQUENCE SET",
    "RULE",
    "POLICY",
    "ROW SECURITY",
    "STATISTICS",
    "STATISTICS DATA",
];

/// How many names an "unknown table" error lists.
const NAMES_SHOWN: usize = 5;

/// What a partial restore restores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Selection {
    /// The dump ids, in archive order.
    pub dump_ids: Vec<i64>,
    /// Every table restored (schema, table): the target must not have them
    /// with rows, unless replacing.
    pub tables: Vec<(String, String)>,
    /// Foreign keys of tables not restored that point at a restored table
    /// (their entries are in `dump_ids`).
    pub incoming: Vec<ForeignKey>,
}

/// A foreign key constraint: its table and its name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ForeignKey {
    pub dump_id: i64,
    pub schema: String,
    pub table: String,
    pub name: String,
}

impl Selection {
    /// The selection without the foreign keys in `dump_ids`.
    pub fn without(mut self, dump_ids: &HashSet<i64>) -> Selection {
        self.dump_ids.retain(|id| !dump_ids.contains(id));
        self.incoming.retain(|fk| !dump_ids.contains(&fk.dump_id));
        self
    }

    /// The `--use-list` file: one entry a line, its dump id first (all
    /// `pg_restore` reads), then what it is, for a person reading it.
    pub fn list_file(&self, head: &ArchiveHead) -> String {
        let by_id: HashMap<i64, &TocEntry> = head.entries.iter().map(|e| (e.dump_id, e)).collect();
        let mut list =
            String::from("; Cairn partial restore: the entries to restore, in archive order\n");
        for id in &self.dump_ids {
            let Some(entry) = by_id.get(id) else { continue };
            let description = format!("{} {} {}", entry.desc, entry.namespace, entry.tag);
            // A name with a line break must not start a line of its own:
            // pg_restore would read a dump id there.
            let description: String = description
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            list.push_str(&format!("{id}; {description}\n"));
        }
        list
    }
}

/// Selects the entries of `tables` (schema, table) and `schemas` in
/// `head`. `schemas_on_target` are the requested schemas the target already
/// has (their `SCHEMA` entry is not restored). An unknown table or schema
/// is an error naming it and some that the archive has.
pub(crate) fn select(
    head: &ArchiveHead,
    tables: &[(String, String)],
    schemas: &[String],
    schemas_on_target: &BTreeSet<String>,
) -> Result<Selection, String> {
    let table_ids: HashMap<(&str, &str), i64> = head
        .entries
        .iter()
        .filter(|e| e.desc == "TABLE")
        .map(|e| ((e.namespace.as_str(), e.tag.as_str()), e.dump_id))
        .collect();
    let mut selected: HashSet<i64> = HashSet::new();
    let mut selected_tables: HashSet<i64> = HashSet::new();
    for (schema, table) in tables {
        match table_ids.get(&(schema.as_str(), table.as_str())) {
            Some(id) => {
                selected.insert(*id);
                selected_tables.insert(*id);
            }
            None => return Err(unknown_table(head, schema, table)),
        }
    }
    let known_schemas = schemas_of(head);
    for schema in schemas {
        if !known_schemas.contains(schema.as_str()) {
            return Err(unknown_schema(&known_schemas, schema));
        }
        let mut schema_ids = HashSet::new();
        if !schemas_on_target.contains(schema) {
            schema_ids.extend(
                head.entries
                    .iter()
                    .filter(|e| e.desc == "SCHEMA" && e.tag == *schema)
                    .map(|e| e.dump_id),
            );
        }
        for entry in &head.entries {
            if entry.namespace == *schema {
                selected.insert(entry.dump_id);
                if entry.desc == "TABLE" {
                    selected_tables.insert(entry.dump_id);
                }
            } else if matches!(entry.desc.as_str(), "COMMENT" | "ACL" | "SECURITY LABEL")
                && entry.dependencies.iter().any(|d| schema_ids.contains(d))
            {
                selected.insert(entry.dump_id);
            }
        }
        selected.extend(schema_ids);
    }

    // What hangs on the selected tables, to a fixed point (a sequence's
    // value hangs on the sequence, which hangs on its table).
    let all_tables: HashSet<i64> = table_ids.values().copied().collect();
    loop {
        let before = selected.len();
        for entry in &head.entries {
            if selected.contains(&entry.dump_id)
                || !FOLLOWS_ITS_TABLE.contains(&entry.desc.as_str())
            {
                continue;
            }
            let hangs_on_selection = entry.dependencies.iter().any(|d| selected.contains(d));
            let needs_another_table = entry
                .dependencies
                .iter()
                .any(|d| all_tables.contains(d) && !selected_tables.contains(d));
            if hangs_on_selection && !needs_another_table {
                selected.insert(entry.dump_id);
            }
        }
        if selected.len() == before {
            break;
        }
    }

    // Foreign keys: see the module documentation.
    let tables_by_id: HashMap<i64, &TocEntry> = head
        .entries
        .iter()
        .filter(|e| e.desc == "TABLE")
        .map(|e| (e.dump_id, e))
        .collect();
    let mut incoming = Vec::new();
    for entry in head.entries.iter().filter(|e| e.desc == "FK CONSTRAINT") {
        let Some((owner, name)) = foreign_key_table(entry, &tables_by_id) else {
            continue;
        };
        if selected_tables.contains(&owner.dump_id) {
            selected.insert(entry.dump_id);
        } else if entry
            .dependencies
            .iter()
            .any(|d| *d != owner.dump_id && selected.contains(d))
        {
            selected.insert(entry.dump_id);
            incoming.push(ForeignKey {
                dump_id: entry.dump_id,
                schema: owner.namespace.clone(),
                table: owner.tag.clone(),
                name: name.to_string(),
            });
        }
    }

    Ok(Selection {
        incoming,
        dump_ids: head
            .entries
            .iter()
            .filter(|e| selected.contains(&e.dump_id))
            .map(|e| e.dump_id)
            .collect(),
        tables: head
            .entries
            .iter()
            .filter(|e| selected_tables.contains(&e.dump_id))
            .map(|e| (e.namespace.clone(), e.tag.clone()))
            .collect(),
    })
}

/// The table a foreign key entry belongs to, and the key's name: its tag
/// is `<table> <constraint>`, and it depends on its table (and on the
/// table it points at, and the key it points at).
fn foreign_key_table<'a>(
    entry: &'a TocEntry,
    tables_by_id: &HashMap<i64, &'a TocEntry>,
) -> Option<(&'a TocEntry, &'a str)> {
    entry
        .dependencies
        .iter()
        .filter_map(|d| tables_by_id.get(d).copied())
        .filter(|table| table.namespace == entry.namespace)
        .filter_map(|table| {
            let name = entry
                .tag
                .strip_prefix(table.tag.as_str())?
                .strip_prefix(' ')?;
            Some((table, name))
        })
        // The longest table name that fits: "a b" over "a" for "a b c".
        .max_by_key(|(table, _)| table.tag.len())
}

/// Every schema the archive has objects in (`public` has no `SCHEMA`
/// entry of its own in recent versions).
fn schemas_of(head: &ArchiveHead) -> BTreeSet<&str> {
    head.entries
        .iter()
        .filter(|e| e.desc == "SCHEMA")
        .map(|e| e.tag.as_str())
        .chain(
            head.entries
                .iter()
                .map(|e| e.namespace.as_str())
                .filter(|n| !n.is_empty()),
        )
        .collect()
}

fn unknown_table(head: &ArchiveHead, schema: &str, table: &str) -> String {
    let mut names: Vec<(&str, &str)> = head
        .entries
        .iter()
        .filter(|e| e.desc == "TABLE")
        .map(|e| (e.namespace.as_str(), e.tag.as_str()))
        .collect();
    names.sort();
    names.dedup();
    let count = names.len();
    if count == 0 {
        return format!(
            "table {} is not in the backup, which has no tables",
            display_table(schema, table)
        );
    }
    // Those of the same schema first: the likeliest to be meant.
    names.sort_by_key(|(s, _)| *s != schema);
    let shown: Vec<String> = names
        .iter()
        .take(NAMES_SHOWN)
        .map(|(s, t)| display_table(s, t))
        .collect();
    format!(
        "table {} is not in the backup, which has {count} table{}: {}{}",
        display_table(schema, table),
        if count == 1 { "" } else { "s" },
        shown.join(", "),
        if count > NAMES_SHOWN { ", ..." } else { "" }
    )
}

fn unknown_schema(known: &BTreeSet<&str>, schema: &str) -> String {
    let shown: Vec<String> = known
        .iter()
        .take(NAMES_SHOWN)
        .map(|s| display_name(s))
        .collect();
    format!(
        "schema {} is not in the backup, which has {}: {}{}",
        display_name(schema),
        if known.len() == 1 {
            "1 schema"
        } else {
            "these schemas"
        },
        shown.join(", "),
        if known.len() > NAMES_SHOWN {
            ", ..."
        } else {
            ""
        }
    )
}

/// A name as `--table`/`--schema` take it: bare when it can be, else
/// double-quoted with `"` doubled.
pub(crate) fn display_name(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '$' || c == '-');
    if bare {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// `schema.table`, quoted where needed.
pub(crate) fn display_table(schema: &str, table: &str) -> String {
    format!("{}.{}", display_name(schema), display_name(table))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dump_id: i64, desc: &str, namespace: &str, tag: &str, deps: &[i64]) -> TocEntry {
        TocEntry {
            dump_id,
            desc: desc.into(),
            namespace: namespace.into(),
            tag: tag.into(),
            owner: "app".into(),
            dependencies: deps.to_vec(),
            defn: None,
            offset_field_at: 0,
        }
    }

    /// Like pg_dump's: two tables in public (orders has a serial id, an
    /// index, a trigger, a comment, a grant, a foreign key to itself; items
    /// has a foreign key to orders and a default using orders' sequence), a
    /// schema "sales" with a table, a function and a comment on the schema.
    /// A foreign key depends on its table, the table it points at and the
    /// key it points at, in no particular order.
    fn head() -> ArchiveHead {
        ArchiveHead {
            entries: vec![
                entry(1, "SCHEMA", "", "sales", &[]),
                entry(2, "COMMENT", "", "SCHEMA sales", &[1]),
                entry(3, "FUNCTION", "public", "touch()", &[]),
                entry(10, "TABLE", "public", "orders", &[]),
                entry(11, "SEQUENCE", "public", "orders_id_seq", &[10]),
                entry(12, "SEQUENCE OWNED BY", "public", "orders_id_seq", &[11]),
                entry(20, "TABLE", "public", "items", &[]),
                entry(21, "DEFAULT", "public", "items line", &[20, 11]),
                entry(13, "DEFAULT", "public", "orders id", &[10, 11]),
                entry(30, "TABLE", "sales", "leads", &[1]),
                entry(31, "FUNCTION", "sales", "score(integer)", &[1]),
                entry(14, "TABLE DATA", "public", "orders", &[10]),
                entry(22, "TABLE DATA", "public", "items", &[20]),
                entry(32, "TABLE DATA", "sales", "leads", &[30]),
                entry(15, "SEQUENCE SET", "public", "orders_id_seq", &[11]),
                entry(16, "CONSTRAINT", "public", "orders orders_pkey", &[10]),
                entry(17, "INDEX", "public", "orders_by_day", &[10]),
                entry(18, "TRIGGER", "public", "orders touch", &[10, 3]),
                entry(
                    23,
                    "FK CONSTRAINT",
                    "public",
                    "items items_order_fkey",
                    &[10, 16, 20],
                ),
                entry(
                    27,
                    "FK CONSTRAINT",
                    "public",
                    "orders orders_parent_fkey",
                    &[10, 10, 16],
                ),
                entry(19, "COMMENT", "public", "TABLE orders", &[10]),
                entry(24, "COMMENT", "public", "INDEX orders_by_day", &[17]),
                entry(25, "ACL", "public", "TABLE orders", &[10]),
                entry(26, "ACL", "sales", "TABLE leads", &[30]),
            ],
            ..Default::default()
        }
    }

    fn check(tables: &[(&str, &str)], schemas: &[&str], on_target: &[&str], expected: &[i64]) {
        let tables: Vec<(String, String)> = tables
            .iter()
            .map(|(s, t)| (s.to_string(), t.to_string()))
            .collect();
        let schemas: Vec<String> = schemas.iter().map(|s| s.to_string()).collect();
        let on_target: BTreeSet<String> = on_target.iter().map(|s| s.to_string()).collect();
        let selection = select(&head(), &tables, &schemas, &on_target).unwrap();
        assert_eq!(
            selection.dump_ids, expected,
            "tables {tables:?} schemas {schemas:?}"
        );
    }

    #[test]
    fn a_table_brings_what_hangs_on_it_alone_in_archive_order() {
        // With its own foreign key (to itself), and items' foreign key to
        // it, which must be dropped and added again around it.
        check(
            &[("public", "orders")],
            &[],
            &[],
            &[10, 11, 12, 13, 14, 15, 16, 17, 18, 23, 27, 19, 24, 25],
        );
        let selection = select(
            &head(),
            &[("public".into(), "orders".into())],
            &[],
            &BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(
            selection.incoming,
            [ForeignKey {
                dump_id: 23,
                schema: "public".into(),
                table: "items".into(),
                name: "items_order_fkey".into(),
            }]
        );
        let without: HashSet<i64> = [23].into();
        assert!(!selection.without(&without).dump_ids.contains(&23));
        // Not orders' sequence; the default that uses it comes (it hangs
        // on no other table) and needs the sequence on the target. Its
        // foreign key to orders comes: orders must be on the target.
        check(&[("public", "items")], &[], &[], &[20, 21, 22, 23]);
        // Both: now items' default on orders' sequence comes too.
        check(
            &[("public", "items"), ("public", "orders")],
            &[],
            &[],
            &[
                10, 11, 12, 20, 21, 13, 14, 22, 15, 16, 17, 18, 23, 27, 19, 24, 25,
            ],
        );
    }

    #[test]
    fn a_foreign_key_belongs_to_the_table_its_tag_begins_with() {
        let tables = [
            entry(1, "TABLE", "public", "a", &[]),
            entry(2, "TABLE", "public", "a b", &[]),
        ];
        let by_id: HashMap<i64, &TocEntry> = tables.iter().map(|t| (t.dump_id, t)).collect();
        let fk = entry(3, "FK CONSTRAINT", "public", "a b c", &[1, 2]);
        let (table, name) = foreign_key_table(&fk, &by_id).unwrap();
        assert_eq!((table.tag.as_str(), name), ("a b", "c"));
        let fk = entry(4, "FK CONSTRAINT", "public", "a x", &[2, 1]);
        let (table, name) = foreign_key_table(&fk, &by_id).unwrap();
        assert_eq!((table.tag.as_str(), name), ("a", "x"));
        let fk = entry(5, "FK CONSTRAINT", "other", "a x", &[1]);
        assert!(foreign_key_table(&fk, &by_id).is_none());
    }

    #[test]
    fn a_schema_brings_everything_in_it_and_itself_when_missing() {
        check(&[], &["sales"], &[], &[1, 2, 30, 31, 32, 26]);
        check(&[], &["sales"], &["sales"], &[30, 31, 32, 26]);
        let selection = select(&head(), &[], &["sales".into()], &BTreeSet::new()).unwrap();
        assert_eq!(
            selection.tables,
            [("sales".to_string(), "leads".to_string())]
        );
    }

    #[test]
    fn unknown_names_are_errors_that_show_what_there_is() {
        let error = select(
            &head(),
            &[("public".into(), "order".into())],
            &[],
            &BTreeSet::new(),
        )
        .unwrap_err();
        assert_eq!(
            error,
            "table public.order is not in the backup, which has 3 tables: public.items, \
             public.orders, sales.leads"
        );
        let error = select(&head(), &[], &["Sales".into()], &BTreeSet::new()).unwrap_err();
        assert_eq!(
            error,
            "schema Sales is not in the backup, which has these schemas: public, sales"
        );
    }

    #[test]
    fn the_list_file_holds_one_dump_id_a_line() {
        let mut head = head();
        head.entries
            .push(entry(40, "TABLE", "public", "evil\n10; x", &[]));
        let selection = Selection {
            dump_ids: vec![10, 40],
            tables: Vec::new(),
            incoming: Vec::new(),
        };
        let list = selection.list_file(&head);
        let lines: Vec<&str> = list.lines().collect();
        assert!(lines[0].starts_with(';'));
        assert_eq!(
            lines[1..],
            ["10; TABLE public orders", "40; TABLE public evil?10; x"]
        );
    }

    #[test]
    fn names_are_shown_as_the_options_take_them() {
        assert_eq!(display_table("public", "orders"), "public.orders");
        assert_eq!(
            display_table("my.schema", "Ünï \"q\""),
            "\"my.schema\".\"Ünï \"\"q\"\"\""
        );
        assert_eq!(display_name("Sales"), "Sales");
        assert_eq!(display_name(""), "\"\"");
    }
}
