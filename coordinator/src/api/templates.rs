//! Templates: pushed by admins as a tar archive of their directory (each push a new
//! version), listed and shown to everyone logged in, deleted by admins while no
//! workspace uses them.

use std::io::Read;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use mesh::Timestamp;
use mesh::api::{self, TEMPLATE_ARCHIVE_MAX, TEMPLATE_FILE, TemplateSpec};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::callers::Caller;
use super::{AppState, blocking, path_name};
use crate::error::{ApiError, ApiResult};
use crate::store::TemplateVersionRecord;

fn view(rec: TemplateVersionRecord, workspaces: u64) -> api::Template {
    api::Template {
        name: rec.name,
        version: rec.version,
        created_at: rec.created_at,
        created_by: rec.created_by,
        sha256: rec.sha256,
        size_bytes: rec.size_bytes,
        spec: rec.spec,
        workspaces,
    }
}

/// `template.toml` read from the archive and checked.
fn spec_of(archive: &[u8]) -> ApiResult<TemplateSpec> {
    let bad = |message: String, detail: &str| ApiError::bad_request(message, detail.to_owned());
    let mut ar = tar::Archive::new(archive);
    let entries = ar.entries().map_err(|e| {
        bad(
            format!("the template is not a tar archive: {e}"),
            "push a directory with `myco templates push DIR`",
        )
    })?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| bad(format!("the template archive is unreadable: {e}"), ""))?;
        let path = entry
            .path()
            .map_err(|e| {
                bad(
                    format!("a path in the template archive is unreadable: {e}"),
                    "",
                )
            })?
            .into_owned();
        let is_spec = path
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .map(|c| c.as_os_str().to_owned())
            .eq([std::ffi::OsString::from(TEMPLATE_FILE)]);
        if !is_spec {
            continue;
        }
        let mut text = String::new();
        entry
            .read_to_string(&mut text)
            .map_err(|e| bad(format!("{TEMPLATE_FILE} is not UTF-8 text: {e}"), ""))?;
        let spec: TemplateSpec = toml::from_str(&text).map_err(|e| {
            bad(
                format!("{TEMPLATE_FILE} is not valid: {}", e.to_string().replace('\n', " ")),
                "it holds [[agents]] (as `myco create --from`), [provisioner] run = \"...\" and [schedule]",
            )
        })?;
        spec.validate()
            .map_err(|e| bad(format!("{TEMPLATE_FILE}: {e}"), ""))?;
        // Made from in the same way as `create --from`; the same limits hold.
        if !spec.agents.is_empty() {
            super::workspaces::validate_agents(&spec.agents, usize::MAX)?;
        }
        // Unpacks as a provisioner would, so a bad entry is refused now, not at the
        // first build.
        let dir = tempfile_dir()?;
        let unpacked = crate::provision::unpack(archive, dir.path());
        drop(dir);
        unpacked.map_err(|e| {
            bad(
                e.to_string(),
                "templates hold regular files and directories only",
            )
        })?;
        return Ok(spec);
    }
    Err(bad(
        format!("the template has no {TEMPLATE_FILE} at its root"),
        "write one: [provisioner] run = \"./provision.sh\", and [[agents]] as for `myco create --from`",
    ))
}

/// A scratch directory that removes itself.
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> ApiResult<ScratchDir> {
    let dir = std::env::temp_dir().join(format!("myco-template-check-{}", crate::auth::new_id()));
    mesh::identity::private_dir(&dir)
        .map_err(|e| ApiError::internal("cannot check the template", e.to_string()))?;
    Ok(ScratchDir(dir))
}

/// `PUT /api/v1/templates/{name}`: a new version of the template, from a tar
/// archive of its directory (admins).
pub(super) async fn push_template(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, Json<api::Template>)> {
    caller.require_admin()?;
    let name = path_name("template name", &name)?;
    let archive = axum::body::to_bytes(body, TEMPLATE_ARCHIVE_MAX)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the template archive is larger than {} MiB",
                    TEMPLATE_ARCHIVE_MAX / (1024 * 1024)
                ),
                "leave big files out of the template directory; fetch them from the provisioner command",
            )
        })?;
    let archive = archive.to_vec();
    let record = blocking(move || {
        let spec = spec_of(&archive)?;
        let record = TemplateVersionRecord {
            name,
            version: 0,
            created_at: Timestamp::now(),
            created_by: caller.user.username.clone(),
            sha256: hex::encode(Sha256::digest(&archive)),
            size_bytes: archive.len() as u64,
            spec,
        };
        Ok(state.store.push_template(record, &archive)?)
    })
    .await?;
    tracing::info!(template = %record.name, version = record.version, "template pushed");
    Ok((StatusCode::CREATED, Json(view(record, 0))))
}

/// `GET /api/v1/templates`: every template's latest version.
pub(super) async fn list_templates(
    State(state): State<AppState>,
    _caller: Caller,
) -> ApiResult<Json<Vec<api::Template>>> {
    let store = state.store.clone();
    let all = blocking(move || Ok(store.templates()?)).await?;
    Ok(Json(all.into_iter().map(|(r, n)| view(r, n)).collect()))
}

#[derive(Deserialize)]
pub(super) struct VersionQuery {
    version: Option<u64>,
}

/// `GET /api/v1/templates/{name}?version=N`: one version, the latest by default.
pub(super) async fn get_template(
    State(state): State<AppState>,
    _caller: Caller,
    Path(name): Path<String>,
    query: Result<Query<VersionQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<api::Template>> {
    let Query(query) =
        query.map_err(|e| ApiError::bad_request("bad query string", e.body_text()))?;
    let name = path_name("template name", &name)?;
    let store = state.store.clone();
    let n = name.clone();
    let found = blocking(move || Ok(store.template(&n, query.version)?)).await?;
    let rec = found.ok_or_else(|| {
        ApiError::not_found(
            format!("template {name} not found"),
            "list them with `myco templates ls`",
        )
    })?;
    Ok(Json(view(rec, 0)))
}

/// `DELETE /api/v1/templates/{name}` (admins): refused while a workspace uses it.
pub(super) async fn delete_template(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let name = path_name("template name", &name)?;
    let store = state.store.clone();
    let n = name.clone();
    if blocking(move || Ok(store.delete_template(&n)?)).await? {
        tracing::info!(template = %name, "template deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(
            format!("template {name} not found"),
            "list them with `myco templates ls`",
        ))
    }
}
