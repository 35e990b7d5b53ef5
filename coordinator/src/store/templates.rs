//! Templates and external provisioners' keys in the store: a template's versions
//! (each `template.toml` with who pushed it) and their archives, and the keys
//! provisioners outside the coordinator authenticate with.

use std::collections::BTreeMap;

use mesh::api::TemplateSpec;
use mesh::{Name, Timestamp};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::tables::{TOKENS, WORKSPACE_NAMES, WORKSPACES, decode, encode};
use super::{Store, StoreError, TokenRecord, WorkspaceRecord, store_failure};

/// Why [`Store::delete_template`] failed.
#[derive(Debug, thiserror::Error)]
pub enum DeleteTemplateError {
    /// Workspaces (`owner/name`) were made from the template.
    #[error(
        "template {template} is used by workspace {}; delete those workspaces first",
        workspaces.join(", ")
    )]
    InUse {
        template: Name,
        workspaces: Vec<String>,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why [`Store::create_provisioner_key`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateProvisionerKeyError {
    /// A provisioner key of this name exists.
    #[error("provisioner key {0} already exists")]
    Exists(Name),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

store_failure!(DeleteTemplateError, CreateProvisionerKeyError);

/// Template name -> latest version number.
pub(super) const TEMPLATES: TableDefinition<&str, u64> = TableDefinition::new("templates");
/// (template, version) -> [`TemplateVersionRecord`].
pub(super) const TEMPLATE_VERSIONS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("template_versions");
/// (template, version) -> the directory as a tar archive.
pub(super) const TEMPLATE_ARCHIVES: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("template_archives");
/// Provisioner key name -> [`ProvisionerKey`] (its token lives in `tokens`).
pub(super) const PROVISIONER_KEYS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("provisioner_keys");

/// One version of a template, less its archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateVersionRecord {
    pub name: Name,
    pub version: u64,
    pub created_at: Timestamp,
    pub created_by: Name,
    pub sha256: String,
    pub size_bytes: u64,
    pub spec: TemplateSpec,
}

/// An external provisioner's key, as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProvisionerKey {
    pub name: Name,
    pub token_id: String,
    pub created_at: Timestamp,
    pub created_by: Name,
}

impl Store {
    /// Keeps a new version of template `name`; returns its number (1 for a new
    /// template).
    pub fn push_template(
        &self,
        mut record: TemplateVersionRecord,
        archive: &[u8],
    ) -> Result<TemplateVersionRecord, StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut latest = txn.open_table(TEMPLATES)?;
            let name = record.name.as_str().to_owned();
            let version = latest.get(name.as_str())?.map_or(0, |v| v.value()) + 1;
            record.version = version;
            latest.insert(name.as_str(), version)?;
            txn.open_table(TEMPLATE_VERSIONS)?
                .insert((name.as_str(), version), encode(&record).as_slice())?;
            txn.open_table(TEMPLATE_ARCHIVES)?
                .insert((name.as_str(), version), archive)?;
        }
        txn.commit()?;
        Ok(record)
    }

    /// A template's version `version`, or its latest.
    pub fn template(
        &self,
        name: &Name,
        version: Option<u64>,
    ) -> Result<Option<TemplateVersionRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let Some(latest) = txn
            .open_table(TEMPLATES)?
            .get(name.as_str())?
            .map(|v| v.value())
        else {
            return Ok(None);
        };
        let version = version.unwrap_or(latest);
        txn.open_table(TEMPLATE_VERSIONS)?
            .get((name.as_str(), version))?
            .map(|v| decode("template_versions", name.as_str(), v.value()))
            .transpose()
    }

    /// Every template's latest version, by name, with how many workspaces use it.
    pub fn templates(&self) -> Result<Vec<(TemplateVersionRecord, u64)>, StoreError> {
        let txn = self.db.begin_read()?;
        let latest = txn.open_table(TEMPLATES)?;
        let versions = txn.open_table(TEMPLATE_VERSIONS)?;
        let mut used: BTreeMap<String, u64> = BTreeMap::new();
        for w in Store::workspaces_in(&txn, None)? {
            if let Some(t) = &w.template {
                *used.entry(t.name.to_string()).or_default() += 1;
            }
        }
        let mut out = Vec::new();
        for row in latest.iter()? {
            let (name, version) = row?;
            if let Some(v) = versions.get((name.value(), version.value()))? {
                let rec: TemplateVersionRecord =
                    decode("template_versions", name.value(), v.value())?;
                let n = used.get(name.value()).copied().unwrap_or(0);
                out.push((rec, n));
            }
        }
        Ok(out)
    }

    /// Deletes a template and all its versions; refused while a workspace uses it.
    pub fn delete_template(&self, name: &Name) -> Result<bool, DeleteTemplateError> {
        let txn = self.db.begin_write()?;
        {
            if txn.open_table(TEMPLATES)?.get(name.as_str())?.is_none() {
                return Ok(false);
            }
            let users: Vec<String> = {
                let names = txn.open_table(WORKSPACE_NAMES)?;
                let workspaces = txn.open_table(WORKSPACES)?;
                let mut users = Vec::new();
                for row in names.iter()? {
                    let (key, id) = row?;
                    if let Some(v) = workspaces.get(id.value())? {
                        let w: WorkspaceRecord = decode("workspaces", id.value(), v.value())?;
                        if w.template.as_ref().is_some_and(|t| &t.name == name) {
                            users.push(key.value().to_owned());
                        }
                    }
                }
                users
            };
            if !users.is_empty() {
                return Err(DeleteTemplateError::InUse {
                    template: name.clone(),
                    workspaces: users,
                });
            }
            txn.open_table(TEMPLATES)?.remove(name.as_str())?;
            let range = (name.as_str(), 0)..=(name.as_str(), u64::MAX);
            txn.open_table(TEMPLATE_VERSIONS)?
                .retain_in(range.clone(), |_, _| false)?;
            txn.open_table(TEMPLATE_ARCHIVES)?
                .retain_in(range, |_, _| false)?;
        }
        txn.commit()?;
        Ok(true)
    }

    /// Keeps a provisioner key and its token; refused when the name is taken.
    pub fn create_provisioner_key(
        &self,
        key: &ProvisionerKey,
        token: &TokenRecord,
    ) -> Result<(), CreateProvisionerKeyError> {
        let txn = self.db.begin_write()?;
        {
            let mut keys = txn.open_table(PROVISIONER_KEYS)?;
            if keys.get(key.name.as_str())?.is_some() {
                return Err(CreateProvisionerKeyError::Exists(key.name.clone()));
            }
            keys.insert(key.name.as_str(), encode(key).as_slice())?;
            txn.open_table(TOKENS)?
                .insert(token.id.as_str(), encode(token).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn provisioner_keys(&self) -> Result<Vec<ProvisionerKey>, StoreError> {
        let txn = self.db.begin_read()?;
        let keys = txn.open_table(PROVISIONER_KEYS)?;
        let mut out = Vec::new();
        for row in keys.iter()? {
            let (k, v) = row?;
            out.push(decode("provisioner_keys", k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Deletes a provisioner key and its token: the provisioner is refused from
    /// its next request, and its running builds are failed when their lease ends.
    pub fn delete_provisioner_key(&self, name: &Name) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        {
            let Some(key) = txn
                .open_table(PROVISIONER_KEYS)?
                .remove(name.as_str())?
                .map(|v| decode::<ProvisionerKey>("provisioner_keys", name.as_str(), v.value()))
                .transpose()?
            else {
                return Ok(false);
            };
            txn.open_table(TOKENS)?.remove(key.token_id.as_str())?;
        }
        txn.commit()?;
        Ok(true)
    }
}
