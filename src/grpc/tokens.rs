//! The auth token file: which bearer tokens the node accepts, and the role
//! each one grants. Re-read on SIGHUP, so a token can be revoked without a
//! restart.
//!
//! Format, one token per line:
//!
//! ```text
//! # comments start with '#' (at the start of a line or after a space)
//! read   3f9c...   # Download, Stat, List, Cluster.Status
//! write  a1b2...   # also Upload and Delete
//! admin  77e0...   # also membership changes (Cluster.ForgetMember)
//! ```
//!
//! A file that holds one bare token and nothing else (the format before
//! roles existed) grants that token `admin`.
//!
//! Error messages name line numbers, never a line's text: a line with its
//! fields swapped would otherwise print a secret into the node's log.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use sha2::{Digest, Sha256};

/// What a token may do. Each role includes everything the ones before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Download, Stat, List, Cluster.Status.
    Read,
    /// Also Upload and Delete.
    Write,
    /// Also membership changes (Cluster.ForgetMember).
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Read, Role::Write, Role::Admin];

    /// The role's name in the token file.
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == text)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a token file's text was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenParseError {
    #[error("holds no token")]
    Empty,
    #[error(
        "line {line}: expected `ROLE TOKEN` with ROLE one of read, write, admin \
         (only a file holding one bare token and nothing else means one admin token)"
    )]
    Malformed { line: usize },
    #[error("line {line}: the role is not one of read, write, admin")]
    UnknownRole { line: usize },
    #[error(
        "line {line}: a token may hold only printable ASCII without spaces (it travels in a header)"
    )]
    BadCharacter { line: usize },
    #[error("line {line}: the same token is also on line {first}")]
    Duplicate { line: usize, first: usize },
}

/// The tokens a node accepts, each with its role. Tokens are kept only as
/// SHA-256 digests: a lookup compares digests, so its timing says nothing
/// about how much of a guessed token was right.
#[derive(Debug, Default)]
pub struct TokenSet {
    roles: HashMap<[u8; 32], Role>,
}

impl TokenSet {
    /// Parses a token file's text.
    pub fn parse(text: &str) -> Result<Self, TokenParseError> {
        let mut bare = Vec::new();
        let mut scoped = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let fields: Vec<&str> = strip_comment(raw).split_whitespace().collect();
            match fields.as_slice() {
                [] => {}
                [token] => bare.push((line, Role::Admin, *token)),
                [role, token] => {
                    let role = Role::parse(role).ok_or(TokenParseError::UnknownRole { line })?;
                    scoped.push((line, role, *token));
                }
                _ => return Err(TokenParseError::Malformed { line }),
            }
        }
        // A bare token is the old one-token format only when it is all there is.
        // The error names the first bare line that breaks that rule.
        if bare.len() > 1 || (!bare.is_empty() && !scoped.is_empty()) {
            let culprit = if bare.len() > 1 { bare[1].0 } else { bare[0].0 };
            return Err(TokenParseError::Malformed { line: culprit });
        }
        let entries = if bare.is_empty() { scoped } else { bare };
        if entries.is_empty() {
            return Err(TokenParseError::Empty);
        }
        let mut roles = HashMap::new();
        let mut first_line = HashMap::new();
        for (line, role, token) in entries {
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(TokenParseError::BadCharacter { line });
            }
            let digest = digest(token.as_bytes());
            if let Some(&first) = first_line.get(&digest) {
                return Err(TokenParseError::Duplicate { line, first });
            }
            first_line.insert(digest, line);
            roles.insert(digest, role);
        }
        Ok(Self { roles })
    }

    /// The role `token` grants, if the set holds it.
    pub fn role_of(&self, token: &[u8]) -> Option<Role> {
        self.roles.get(&digest(token)).copied()
    }

    /// How many tokens hold `role`.
    pub fn count(&self, role: Role) -> usize {
        self.roles.values().filter(|r| **r == role).count()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// A line without its comment: `#` starts one at the start of the line or
/// after whitespace, so a token may still contain `#`.
fn strip_comment(line: &str) -> &str {
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        if c == '#' && prev_space {
            return &line[..i];
        }
        prev_space = c.is_whitespace();
    }
    line
}

/// Why the token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read auth token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("auth token file {path} {source}")]
    Parse {
        path: PathBuf,
        source: TokenParseError,
    },
}

/// The token file and the set last loaded from it. Calls see either the old
/// set or the new one, never a mix; a reload that fails keeps the old set.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    current: RwLock<Arc<TokenSet>>,
}

impl TokenFile {
    /// Reads and parses the file; any problem is a start-up failure.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let set = read_set(path)?;
        Ok(Self {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(set)),
        })
    }

    /// Reads the file again and, if it parses, serves its tokens from now on.
    pub fn reload(&self) -> Result<Arc<TokenSet>, TokenFileError> {
        let set = Arc::new(read_set(&self.path)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = set.clone();
        Ok(set)
    }

    /// The tokens in force.
    pub fn tokens(&self) -> Arc<TokenSet> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Where the tokens come from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read_set(path: &Path) -> Result<TokenSet, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    TokenSet::parse(&text).map_err(|source| TokenFileError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Logs what a token set holds (counts per role, never a token).
pub fn log_loaded(set: &TokenSet, path: &Path, what: &str) {
    tracing::info!(
        path = %path.display(),
        read = set.count(Role::Read),
        write = set.count(Role::Write),
        admin = set.count(Role::Admin),
        "{what}"
    );
}

/// Re-reads the token file on every SIGHUP, for the life of the process.
/// Without a token file there is nothing to reload, but SIGHUP is still
/// caught (and logged) so a stray one never kills the node. The handler is
/// in place when this returns (call it inside the runtime, before serving),
/// so a SIGHUP sent once the node serves never meets the default action.
pub fn reload_on_sighup(tokens: Option<Arc<TokenFile>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; the auth token file will not be reloaded");
            return;
        }
    };
    tokio::spawn(reload_loop(hup, tokens));
}

async fn reload_loop(mut hup: tokio::signal::unix::Signal, tokens: Option<Arc<TokenFile>>) {
    while hup.recv().await.is_some() {
        let Some(file) = &tokens else {
            tracing::info!("received SIGHUP: no --auth-token-file to reload");
            continue;
        };
        match file.reload() {
            Ok(set) => log_loaded(
                &set,
                file.path(),
                "received SIGHUP: reloaded the auth token file",
            ),
            Err(e) => tracing::error!(
                error = %e,
                "received SIGHUP: auth token file reload failed; keeping the tokens loaded before"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_comments_and_blank_lines() {
        let set = TokenSet::parse(
            "# tokens for the staging cluster\n\
             \n\
             read   r-token   # the dashboards\n\
             write\tw-token\n\
             admin a#token\n",
        )
        .unwrap();
        assert_eq!(set.role_of(b"r-token"), Some(Role::Read));
        assert_eq!(set.role_of(b"w-token"), Some(Role::Write));
        assert_eq!(set.role_of(b"a#token"), Some(Role::Admin));
        assert_eq!(set.role_of(b"r-toke"), None);
        assert_eq!(set.role_of(b"read"), None);
        assert_eq!((set.count(Role::Read), set.count(Role::Admin)), (1, 1));
    }

    #[test]
    fn one_bare_token_is_admin() {
        let set = TokenSet::parse("  s3cret \n\n").unwrap();
        assert_eq!(set.role_of(b"s3cret"), Some(Role::Admin));
        let set = TokenSet::parse("# legacy\ns3cret\n").unwrap();
        assert_eq!(set.role_of(b"s3cret"), Some(Role::Admin));
    }

    #[test]
    fn bad_files_name_the_line() {
        use TokenParseError::*;
        let cases: &[(&str, TokenParseError)] = &[
            ("", Empty),
            ("# only a comment\n\n", Empty),
            ("reader tok\n", UnknownRole { line: 1 }),
            ("READ tok\n", UnknownRole { line: 1 }),
            ("read a b\n", Malformed { line: 1 }),
            ("tok1\ntok2\n", Malformed { line: 2 }),
            ("read r\nbare\n", Malformed { line: 2 }),
            ("bare\nread r\n", Malformed { line: 1 }),
            ("read caf\u{e9}\n", BadCharacter { line: 1 }),
            ("read t\n#\nadmin t\n", Duplicate { line: 3, first: 1 }),
        ];
        for (text, want) in cases {
            assert_eq!(TokenSet::parse(text).unwrap_err(), *want, "{text:?}");
        }
    }

    #[test]
    fn errors_never_quote_the_file() {
        // Fields swapped: the token sits where the role should be.
        let err = TokenSet::parse("SECRET-TOKEN read\n").unwrap_err();
        assert!(!err.to_string().contains("SECRET"), "{err}");
    }

    #[test]
    fn failed_reload_keeps_the_old_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "read one\n").unwrap();
        let file = TokenFile::load(&path).unwrap();
        std::fs::write(&path, "read two\nnonsense here too\n").unwrap();
        assert!(file.reload().is_err());
        assert_eq!(file.tokens().role_of(b"one"), Some(Role::Read));
        std::fs::write(&path, "write two\n").unwrap();
        file.reload().unwrap();
        assert_eq!(file.tokens().role_of(b"one"), None);
        assert_eq!(file.tokens().role_of(b"two"), Some(Role::Write));
    }
}
