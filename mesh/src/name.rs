//! Names of users, workspaces, agents, apps and tokens, and references such as
//! `alice/dev.main` that name a workspace or one of its agents.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// The longest name we accept. Names become DNS-like host aliases (`myco.WS.AGENT`),
/// so they stay short and within `[a-z0-9-]`.
pub const MAX_NAME_LEN: usize = 32;

/// A validated name: 1 to 32 characters of `[a-z0-9-]`, not starting with `-`
/// (it would read as a command-line flag).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Name(String);

/// Why a string is not a valid [`Name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The string is empty.
    #[error("name is empty; use 1 to {MAX_NAME_LEN} characters of a-z, 0-9 and -")]
    Empty,
    /// The string is longer than [`MAX_NAME_LEN`].
    #[error("name {0:?} is {1} characters long; use at most {MAX_NAME_LEN}")]
    TooLong(String, usize),
    /// The string holds a character outside `[a-z0-9-]`.
    #[error("name {0:?} contains {1:?}; use only lower-case a-z, 0-9 and -")]
    BadChar(String, char),
    /// The string starts with a hyphen.
    #[error("name {0:?} starts with '-'; start with a letter or a digit")]
    LeadingHyphen(String),
}

impl Name {
    pub fn new(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        let len = s.chars().count();
        if len > MAX_NAME_LEN {
            return Err(NameError::TooLong(s.to_owned(), len));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(NameError::BadChar(s.to_owned(), c));
        }
        if s.starts_with('-') {
            return Err(NameError::LeadingHyphen(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Name::new(&s).map_err(serde::de::Error::custom)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A reference to a workspace and optionally one of its agents, written
/// `[OWNER/]WORKSPACE[.AGENT]`. Without an owner it means the caller's own workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceRef {
    pub owner: Option<Name>,
    pub workspace: Name,
    pub agent: Option<Name>,
}

/// Why a string is not a valid [`WorkspaceRef`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkspaceRefError {
    /// One of the parts is not a valid name.
    #[error("bad workspace reference {reference:?}: {source}")]
    Part {
        reference: String,
        #[source]
        source: NameError,
    },
    /// The reference has more separators than `OWNER/WORKSPACE.AGENT` allows.
    #[error("bad workspace reference {0:?}: write it as [OWNER/]WORKSPACE[.AGENT]")]
    Shape(String),
}

impl FromStr for WorkspaceRef {
    type Err = WorkspaceRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let part = |p: &str| {
            Name::new(p).map_err(|source| WorkspaceRefError::Part {
                reference: s.to_owned(),
                source,
            })
        };
        let (owner, rest) = match s.split_once('/') {
            Some((o, r)) => (Some(part(o)?), r),
            None => (None, s),
        };
        if rest.contains('/') {
            return Err(WorkspaceRefError::Shape(s.to_owned()));
        }
        let (workspace, agent) = match rest.split_once('.') {
            Some((w, a)) => {
                if a.contains('.') {
                    return Err(WorkspaceRefError::Shape(s.to_owned()));
                }
                (part(w)?, Some(part(a)?))
            }
            None => (part(rest)?, None),
        };
        Ok(Self {
            owner,
            workspace,
            agent,
        })
    }
}

impl fmt::Display for WorkspaceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(o) = &self.owner {
            write!(f, "{o}/")?;
        }
        write!(f, "{}", self.workspace)?;
        if let Some(a) = &self.agent {
            write!(f, ".{a}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects_names() {
        assert!(Name::new("dev-1").is_ok());
        assert!(Name::new(&"a".repeat(32)).is_ok());
        assert_eq!(Name::new(""), Err(NameError::Empty));
        assert!(matches!(
            Name::new(&"a".repeat(33)),
            Err(NameError::TooLong(_, 33))
        ));
        assert!(matches!(Name::new("Dev"), Err(NameError::BadChar(_, 'D'))));
        assert!(matches!(Name::new("a_b"), Err(NameError::BadChar(_, '_'))));
        assert!(matches!(Name::new("-x"), Err(NameError::LeadingHyphen(_))));
    }

    #[test]
    fn parses_workspace_refs() {
        let r: WorkspaceRef = "alice/dev.main".parse().unwrap();
        assert_eq!(r.owner.unwrap().as_str(), "alice");
        assert_eq!(r.workspace.as_str(), "dev");
        assert_eq!(r.agent.unwrap().as_str(), "main");

        let r: WorkspaceRef = "dev".parse().unwrap();
        assert!(r.owner.is_none() && r.agent.is_none());
        assert_eq!(r.to_string(), "dev");

        assert!(matches!(
            "a/b/c".parse::<WorkspaceRef>(),
            Err(WorkspaceRefError::Shape(_))
        ));
        assert!(matches!(
            "a.b.c".parse::<WorkspaceRef>(),
            Err(WorkspaceRefError::Shape(_))
        ));
        assert!(matches!(
            "Dev".parse::<WorkspaceRef>(),
            Err(WorkspaceRefError::Part { .. })
        ));
    }
}
