//! Just enough of an SQL lexer for what a restore reads in a backup's SQL:
//! statements split where PostgreSQL would split them, the identifiers a
//! statement names, and the options of a `CREATE DATABASE`.
//!
//! It knows comments (nested block comments too), string literals
//! (standard, `E''`, `U&''` and dollar-quoted) and quoted identifiers, so
//! that a `;` or a newline inside a comment or a password hash never splits
//! a statement. Statements are kept exactly as written, to be run as they
//! are.

use std::collections::BTreeSet;
use std::ops::Range;

/// One token of SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Token {
    /// An unquoted word: a keyword or an identifier (folded to lower case,
    /// as PostgreSQL folds it).
    Word(String),
    /// A double-quoted identifier, unescaped.
    Quoted(String),
    /// A string literal: its value for a standard one (`''` read as
    /// `'`), its text as written for the others (`E''`, `U&''`, dollar
    /// quoted).
    Literal(String),
    /// Any other character but `;`.
    Symbol(char),
}

impl Token {
    pub(super) fn is_keyword(&self, keyword: &str) -> bool {
        matches!(self, Token::Word(word) if word == keyword)
    }

    /// The identifier this token names, if it can name one.
    pub(super) fn identifier(&self) -> Option<&str> {
        match self {
            Token::Word(word) | Token::Quoted(word) => Some(word),
            _ => None,
        }
    }
}

/// A statement: its text (without the `;`) and its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Statement {
    pub text: String,
    pub tokens: Vec<Token>,
    /// Where each token is in `text` (byte ranges, one per token), so that
    /// a clause can be cut out of the statement as written.
    pub spans: Vec<Range<usize>>,
}

/// Splits `sql` into statements. A statement left open at the end (no
/// `;`) is kept too.
pub(super) fn statements(sql: &str) -> Vec<Statement> {
    let mut lexer = Lexer { text: sql, at: 0 };
    let mut statements = Vec::new();
    let mut start: Option<usize> = None;
    let mut tokens = Vec::new();
    let mut spans = Vec::new();
    loop {
        lexer.skip_blanks_and_comments();
        let token_start = lexer.at;
        match lexer.next_token() {
            None => break,
            Some(Lexed::End) => {
                if let Some(start) = start.take() {
                    statements.push(Statement {
                        text: sql[start..token_start].trim_end().to_string(),
                        tokens: std::mem::take(&mut tokens),
                        spans: std::mem::take(&mut spans),
                    });
                }
            }
            Some(Lexed::Token(token)) => {
                let start = *start.get_or_insert(token_start);
                tokens.push(token);
                spans.push(token_start - start..lexer.at - start);
            }
        }
    }
    if let Some(start) = start {
        statements.push(Statement {
            text: sql[start..].trim_end().to_string(),
            tokens,
            spans,
        });
    }
    statements
}

/// The identifiers (unquoted words folded, quoted ones as written) of an
/// SQL text, keywords included: callers match them against role names.
pub(crate) fn identifiers(sql: &str) -> BTreeSet<String> {
    statements(sql)
        .into_iter()
        .flat_map(|statement| statement.tokens)
        .filter_map(|token| token.identifier().map(str::to_string))
        .collect()
}

enum Lexed {
    Token(Token),
    /// A `;`.
    End,
}

struct Lexer<'a> {
    text: &'a str,
    at: usize,
}

impl Lexer<'_> {
    fn rest(&self) -> &str {
        &self.text[self.at..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.at += c.len_utf8();
        Some(c)
    }

    fn skip_blanks_and_comments(&mut self) {
        loop {
            let rest = self.rest();
            if rest.starts_with("--") {
                self.at += rest.find('\n').unwrap_or(rest.len());
            } else if rest.starts_with("/*") {
                // Block comments nest in PostgreSQL.
                self.at += 2;
                let mut depth = 1;
                while depth > 0 {
                    let rest = self.rest();
                    if rest.is_empty() {
                        return;
                    } else if rest.starts_with("/*") {
                        depth += 1;
                        self.at += 2;
                    } else if rest.starts_with("*/") {
                        depth -= 1;
                        self.at += 2;
                    } else {
                        self.bump();
                    }
                }
            } else if self.peek().is_some_and(char::is_whitespace) {
                self.bump();
            } else {
                return;
            }
        }
    }

    fn next_token(&mut self) -> Option<Lexed> {
        let c = self.peek()?;
        if c == ';' {
            self.bump();
            return Some(Lexed::End);
        }
        if c == '\'' {
            self.bump();
            let start = self.at;
            self.string_body(false);
            let body = &self.text[start..self.at];
            let value = body.strip_suffix('\'').unwrap_or(body).replace("''", "'");
            return Some(Lexed::Token(Token::Literal(value)));
        }
        if c == '"' {
            self.bump();
            return Some(Lexed::Token(Token::Quoted(self.quoted_body())));
        }
        if c == '$'
            && let Some(tag) = self.dollar_tag()
        {
            let start = self.at;
            self.at += tag.len();
            match self.rest().find(&tag) {
                Some(end) => self.at += end + tag.len(),
                None => self.at = self.text.len(),
            }
            return Some(Lexed::Token(Token::Literal(
                self.text[start..self.at].to_string(),
            )));
        }
        if is_word_start(c) {
            let start = self.at;
            while self.peek().is_some_and(is_word_char) {
                self.bump();
            }
            let word = &self.text[start..self.at];
            // E'...' (backslash escapes), and U&'...' / U&"..." taken
            // as they come (their escapes are not decoded).
            if self.peek() == Some('\'') && word.eq_ignore_ascii_case("e") {
                self.bump();
                self.string_body(true);
                return Some(Lexed::Token(Token::Literal(
                    self.text[start..self.at].to_string(),
                )));
            }
            if word.eq_ignore_ascii_case("u") && self.rest().starts_with("&'") {
                self.at += 2;
                self.string_body(false);
                return Some(Lexed::Token(Token::Literal(
                    self.text[start..self.at].to_string(),
                )));
            }
            if word.eq_ignore_ascii_case("u") && self.rest().starts_with("&\"") {
                self.at += 2;
                return Some(Lexed::Token(Token::Quoted(self.quoted_body())));
            }
            return Some(Lexed::Token(Token::Word(word.to_lowercase())));
        }
        self.bump();
        Some(Lexed::Token(Token::Symbol(c)))
    }

    /// After the opening `'`: up to and past the closing one.
    fn string_body(&mut self, backslash_escapes: bool) {
        while let Some(c) = self.bump() {
            match c {
                '\\' if backslash_escapes => {
                    self.bump();
                }
                '\'' if self.peek() == Some('\'') => {
                    self.bump();
                }
                '\'' => return,
                _ => {}
            }
        }
    }

    /// After the opening `"`: the identifier, `""` read as `"`.
    fn quoted_body(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.bump() {
            if c == '"' {
                if self.peek() == Some('"') {
                    self.bump();
                    name.push('"');
                } else {
                    break;
                }
            } else {
                name.push(c);
            }
        }
        name
    }

    /// `$tag$` or `$$` at the cursor (a dollar quote's opening), if any.
    fn dollar_tag(&self) -> Option<String> {
        let rest = self.rest();
        let inner = &rest[1..];
        let end = inner.find('$')?;
        let tag = &inner[..end];
        let valid = tag.chars().enumerate().all(|(index, c)| {
            if index == 0 {
                is_word_start(c)
            } else {
                is_word_char(c) && c != '$'
            }
        });
        valid.then(|| rest[..end + 2].to_string())
    }
}

fn is_word_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || !c.is_ascii()
}

fn is_word_char(c: char) -> bool {
    is_word_start(c) || c.is_ascii_digit() || c == '$'
}

/// The options of the archive's `CREATE DATABASE` that a new database
/// of the same kind takes (encoding and locale), as (keyword, value); the
/// keywords are from a fixed list, so they can be put in SQL as they are.
pub(crate) fn database_options(create_database: &str) -> Vec<(&'static str, String)> {
    const KEPT: &[&str] = &[
        "ENCODING",
        "LOCALE_PROVIDER",
        "LOCALE",
        "LC_COLLATE",
        "LC_CTYPE",
        "ICU_LOCALE",
        "ICU_RULES",
        "BUILTIN_LOCALE",
    ];
    let Some(statement) = statements(create_database).into_iter().next() else {
        return Vec::new();
    };
    let mut options = Vec::new();
    for window in statement.tokens.windows(3) {
        let [Token::Word(key), Token::Symbol('='), value] = window else {
            continue;
        };
        let Some(keyword) = KEPT.iter().find(|k| k.eq_ignore_ascii_case(key)) else {
            continue;
        };
        let value = match value {
            Token::Word(word) | Token::Quoted(word) | Token::Literal(word) => word.clone(),
            Token::Symbol(_) => continue,
        };
        if !options.iter().any(|(k, _)| k == keyword) {
            options.push((*keyword, value));
        }
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_only_outside_quotes_and_comments() {
        let check = |sql: &str, expected: &[&str]| {
            let texts: Vec<String> = statements(sql).into_iter().map(|s| s.text).collect();
            assert_eq!(texts, expected, "{sql:?}");
        };
        check("", &[]);
        check(" ; ;", &[]);
        check("a; b", &["a", "b"]);
        check("a 'x;y' ;b", &["a 'x;y'", "b"]);
        check("a \"x;\"\"y\" ; b", &["a \"x;\"\"y\"", "b"]);
        check("a -- c;\n b; c", &["a -- c;\n b", "c"]);
        check(
            "a $$ x; $$; b $t$ $$; $t$;",
            &["a $$ x; $$", "b $t$ $$; $t$"],
        );
        check("a E'\\';'; b", &["a E'\\';'", "b"]);
        check("/* x; /* y; */ z; */ a; b", &["a", "b"]);
        check("a 'unterminated; b", &["a 'unterminated; b"]);
        check("price$1; b", &["price$1", "b"]);
    }

    #[test]
    fn identifiers_fold_bare_words_and_keep_quoted_ones() {
        let words = identifiers(
            "GRANT SELECT ON TABLE public.\"Orders\" TO Alice;\n\
             ALTER DEFAULT PRIVILEGES FOR ROLE \"bob\"\"s\" IN SCHEMA x GRANT ALL ON TABLES TO \"Read Only\";\n\
             REVOKE ALL ON SCHEMA public FROM PUBLIC; -- carol\n",
        );
        for expected in ["alice", "bob\"s", "Read Only", "Orders", "public", "select"] {
            assert!(words.contains(expected), "{expected} in {words:?}");
        }
        assert!(!words.contains("Alice"));
        assert!(!words.contains("carol"), "comments are not read");
    }

    #[test]
    fn spans_point_at_each_token_as_written() {
        let sql = "/* c */ CREATE ROLE \"A \"\"b\"\"\" -- x;\n  'p;w' E'q\\';r'; GRANT a TO b";
        let all = statements(sql);
        let pieces = |statement: &Statement| -> Vec<String> {
            statement
                .spans
                .iter()
                .map(|span| statement.text[span.clone()].to_string())
                .collect()
        };
        assert_eq!(all[0].spans.len(), all[0].tokens.len());
        assert_eq!(
            pieces(&all[0]),
            ["CREATE", "ROLE", "\"A \"\"b\"\"\"", "'p;w'", "E'q\\';r'"]
        );
        assert_eq!(pieces(&all[1]), ["GRANT", "a", "TO", "b"]);
    }

    #[test]
    fn literals_keep_their_value() {
        let tokens = &statements("x 'it''s' E'a\\'b' $q$ 'z' $q$;")[0].tokens;
        assert_eq!(
            tokens[1..],
            [
                Token::Literal("it's".into()),
                Token::Literal("E'a\\'b'".into()),
                Token::Literal("$q$ 'z' $q$".into()),
            ]
        );
    }

    #[test]
    fn database_options_keep_encoding_and_locale_only() {
        let options = database_options(
            "CREATE DATABASE encoding WITH TEMPLATE = template0 ENCODING = 'UTF8' \
             LOCALE_PROVIDER = libc LOCALE = 'en_US.UTF-8' OWNER = x;\n",
        );
        assert_eq!(
            options,
            [
                ("ENCODING", "UTF8".to_string()),
                ("LOCALE_PROVIDER", "libc".to_string()),
                ("LOCALE", "en_US.UTF-8".to_string()),
            ]
        );
        let options = database_options(
            "CREATE DATABASE \"a b\" WITH TEMPLATE = template0 ENCODING = 'LATIN1' \
             LC_COLLATE = 'de_DE' LC_CTYPE = 'de_DE';",
        );
        assert_eq!(
            options.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            ["ENCODING", "LC_COLLATE", "LC_CTYPE"]
        );
        assert!(database_options("").is_empty());
    }
}
