//! Users and their tokens: login sessions, named API tokens (with their per-user
//! quota) and token lookups. Agent and provisioner tokens are written with their
//! workspace (`workspaces`) and key (`lifecycle`).

use mesh::Name;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::tables::{
    CheckQuotaError, TOKEN_NAMES, TOKENS, USERS, WORKSPACE_NAMES, check_quota, decode, encode,
    name_key,
};
use super::{QuotaReached, Store, StoreError, TokenKind, TokenRecord, UserRecord, store_failure};

/// Why [`Store::create_first_user`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateFirstUserError {
    /// A user exists already, so the first one was made before.
    #[error("the first user has already been created")]
    Exists,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why [`Store::create_user`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateUserError {
    /// A user of this name exists.
    #[error("user {0} already exists")]
    Exists(Name),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why [`Store::update_user`] failed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateUserError {
    /// No user of this name.
    #[error("user {0} not found")]
    NotFound(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why [`Store::delete_user`] failed.
#[derive(Debug, thiserror::Error)]
pub enum DeleteUserError {
    /// The user owns workspaces, which would be left without an owner.
    #[error("user {0} still owns workspaces")]
    OwnsWorkspaces(Name),
    /// No user of this name.
    #[error("user {0} not found")]
    NotFound(Name),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why [`Store::insert_token`] failed.
#[derive(Debug, thiserror::Error)]
pub enum InsertTokenError {
    /// The owner has an API token of this name.
    #[error("token {name} of {owner} already exists")]
    Exists { owner: Name, name: Name },
    /// The owner holds as many API tokens as their quota allows.
    #[error(transparent)]
    Quota(QuotaReached),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<CheckQuotaError> for InsertTokenError {
    fn from(e: CheckQuotaError) -> Self {
        match e {
            CheckQuotaError::Reached(q) => Self::Quota(q),
            CheckQuotaError::Store(e) => Self::Store(e),
        }
    }
}

store_failure!(
    InsertTokenError,
    CreateFirstUserError,
    CreateUserError,
    UpdateUserError,
    DeleteUserError
);

impl Store {
    pub fn has_users(&self) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(!txn.open_table(USERS)?.is_empty()?)
    }

    /// Creates the first user, only while no user exists. The check and the insert are
    /// one write transaction, so two racing bootstraps cannot both succeed.
    pub fn create_first_user(&self, user: &UserRecord) -> Result<(), CreateFirstUserError> {
        let txn = self.db.begin_write()?;
        {
            let mut users = txn.open_table(USERS)?;
            if !users.is_empty()? {
                return Err(CreateFirstUserError::Exists);
            }
            users.insert(user.username.as_str(), encode(user).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn create_user(&self, user: &UserRecord) -> Result<(), CreateUserError> {
        let txn = self.db.begin_write()?;
        {
            let mut users = txn.open_table(USERS)?;
            if users.get(user.username.as_str())?.is_some() {
                return Err(CreateUserError::Exists(user.username.clone()));
            }
            users.insert(user.username.as_str(), encode(user).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn user(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let users = txn.open_table(USERS)?;
        users
            .get(username)?
            .map(|v| decode("users", username, v.value()))
            .transpose()
    }

    pub fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let users = txn.open_table(USERS)?;
        let mut out = Vec::new();
        for row in users.iter()? {
            let (k, v) = row?;
            out.push(decode("users", k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Stores a token. A named API token must be unique per owner, and is refused
    /// when its owner holds `max_api_tokens` already.
    pub fn insert_token(
        &self,
        token: &TokenRecord,
        max_api_tokens: Option<usize>,
    ) -> Result<(), InsertTokenError> {
        let txn = self.db.begin_write()?;
        {
            let mut tokens = txn.open_table(TOKENS)?;
            if let TokenKind::Api { user, name } = &token.kind {
                let mut names = txn.open_table(TOKEN_NAMES)?;
                let key = name_key(user, name);
                if names.get(key.as_str())?.is_some() {
                    return Err(InsertTokenError::Exists {
                        owner: user.clone(),
                        name: name.clone(),
                    });
                }
                check_quota(&names, "API tokens", user, max_api_tokens)?;
                names.insert(key.as_str(), token.id.as_str())?;
            }
            tokens.insert(token.id.as_str(), encode(token).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let tokens = txn.open_table(TOKENS)?;
        tokens
            .get(id)?
            .map(|v| decode("tokens", id, v.value()))
            .transpose()
    }

    /// The named API tokens of `owner`, or of everyone when `None`.
    pub fn api_tokens(&self, owner: Option<&Name>) -> Result<Vec<TokenRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let names = txn.open_table(TOKEN_NAMES)?;
        let tokens = txn.open_table(TOKENS)?;
        let mut out = Vec::new();
        let prefix = owner.map(|o| format!("{o}/"));
        let rows = match &prefix {
            Some(p) => names.range(p.as_str()..)?,
            None => names.iter()?,
        };
        for row in rows {
            let (k, id) = row?;
            if let Some(p) = &prefix
                && !k.value().starts_with(p.as_str())
            {
                break;
            }
            if let Some(v) = tokens.get(id.value())? {
                out.push(decode("tokens", id.value(), v.value())?);
            }
        }
        Ok(out)
    }

    /// Deletes a token by id. Returns whether it existed.
    pub fn delete_token(&self, id: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = {
            let mut tokens = txn.open_table(TOKENS)?;
            let old = tokens
                .remove(id)?
                .map(|v| decode::<TokenRecord>("tokens", id, v.value()))
                .transpose()?;
            if let Some(TokenRecord {
                kind: TokenKind::Api { user, name },
                ..
            }) = &old
            {
                txn.open_table(TOKEN_NAMES)?
                    .remove(name_key(user, name).as_str())?;
            }
            old.is_some()
        };
        txn.commit()?;
        Ok(existed)
    }

    /// Changes user `username` with `change`; returns the record as stored.
    pub fn update_user(
        &self,
        username: &str,
        change: impl FnOnce(&mut UserRecord),
    ) -> Result<UserRecord, UpdateUserError> {
        let txn = self.db.begin_write()?;
        let user = {
            let mut users = txn.open_table(USERS)?;
            let mut user: UserRecord = users
                .get(username)?
                .map(|v| decode("users", username, v.value()))
                .transpose()?
                .ok_or_else(|| UpdateUserError::NotFound(username.to_owned()))?;
            change(&mut user);
            users.insert(username, encode(&user).as_slice())?;
            user
        };
        txn.commit()?;
        Ok(user)
    }

    /// Deletes every login session and API token of `username`; returns the ids
    /// deleted.
    pub fn delete_user_tokens(&self, username: &str) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_write()?;
        let ids = Self::remove_user_tokens(&txn, username, None, false)?;
        txn.commit()?;
        Ok(ids)
    }

    /// Like [`Store::delete_user_tokens`], login sessions only, and all but `keep`
    /// (a token id).
    pub fn delete_user_sessions(
        &self,
        username: &str,
        keep: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_write()?;
        let ids = Self::remove_user_tokens(&txn, username, keep, true)?;
        txn.commit()?;
        Ok(ids)
    }

    /// A full scan of the tokens: rare admin operations only.
    fn remove_user_tokens(
        txn: &redb::WriteTransaction,
        username: &str,
        keep: Option<&str>,
        sessions_only: bool,
    ) -> Result<Vec<String>, StoreError> {
        let mut tokens = txn.open_table(TOKENS)?;
        let mut names = txn.open_table(TOKEN_NAMES)?;
        let mut gone = Vec::new();
        for row in tokens.iter()? {
            let (k, v) = row?;
            let t: TokenRecord = decode("tokens", k.value(), v.value())?;
            let owner = match &t.kind {
                TokenKind::Session { user } => user,
                TokenKind::Api { user, .. } if !sessions_only => user,
                TokenKind::Api { .. } | TokenKind::Agent { .. } | TokenKind::Provisioner { .. } => {
                    continue;
                }
            };
            if owner.as_str() == username && Some(t.id.as_str()) != keep {
                gone.push(t);
            }
        }
        for t in &gone {
            tokens.remove(t.id.as_str())?;
            if let TokenKind::Api { user, name } = &t.kind {
                names.remove(name_key(user, name).as_str())?;
            }
        }
        Ok(gone.into_iter().map(|t| t.id).collect())
    }

    /// Deletes user `username` and all their tokens, returning the tokens' ids;
    /// refused while they own workspaces.
    pub fn delete_user(&self, username: &Name) -> Result<Vec<String>, DeleteUserError> {
        let txn = self.db.begin_write()?;
        let ids = {
            let prefix = format!("{username}/");
            let owns = txn
                .open_table(WORKSPACE_NAMES)?
                .range(prefix.as_str()..)?
                .next()
                .transpose()?
                .is_some_and(|(k, _)| k.value().starts_with(prefix.as_str()));
            if owns {
                return Err(DeleteUserError::OwnsWorkspaces(username.clone()));
            }
            if txn.open_table(USERS)?.remove(username.as_str())?.is_none() {
                return Err(DeleteUserError::NotFound(username.clone()));
            }
            Self::remove_user_tokens(&txn, username.as_str(), None, false)?
        };
        txn.commit()?;
        Ok(ids)
    }

    /// Deletes `owner`'s API token called `name`. Returns its id if it existed.
    pub fn delete_api_token(
        &self,
        owner: &Name,
        name: &Name,
    ) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = {
            let mut names = txn.open_table(TOKEN_NAMES)?;
            let id = names
                .remove(name_key(owner, name).as_str())?
                .map(|v| v.value().to_owned());
            if let Some(id) = &id {
                txn.open_table(TOKENS)?.remove(id.as_str())?;
            }
            id
        };
        txn.commit()?;
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fixtures::user;

    #[test]
    fn first_user_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        assert!(!store.has_users().unwrap());
        store.create_first_user(&user("alice")).unwrap();
        assert!(matches!(
            store.create_first_user(&user("bob")),
            Err(CreateFirstUserError::Exists)
        ));
        assert!(matches!(
            store.create_user(&user("alice")),
            Err(CreateUserError::Exists(_))
        ));
    }
}
