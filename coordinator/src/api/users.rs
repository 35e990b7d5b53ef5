//! Users and login sessions: the first user (an admin), login, logout, `me`, and the
//! admin's list and create.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{Extensions, StatusCode};
use mesh::api::{self, CreateUser, Credentials, FirstUserStatus, Session};
use mesh::{Name, Timestamp};

use super::callers::Caller;
use super::{AppState, ME, blocking, path_name};
use crate::auth;
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::store::{CreateFirstUserError, CreateUserError, Store, TokenKind, UserRecord};

/// How long a login session lasts.
const SESSION_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

fn user_view(u: &UserRecord) -> api::User {
    api::User {
        username: u.username.clone(),
        admin: u.admin,
        created_at: u.created_at,
        disabled: u.disabled,
    }
}

fn check_password(password: &str) -> ApiResult<()> {
    if password.chars().count() < auth::MIN_PASSWORD_LEN {
        return Err(ApiError::bad_request(
            "password is too short",
            format!("use at least {} characters", auth::MIN_PASSWORD_LEN),
        ));
    }
    Ok(())
}

fn check_username(name: &Name) -> ApiResult<()> {
    if name.as_str() == ME {
        return Err(ApiError::bad_request(
            "username \"me\" is reserved",
            "it stands for the caller in API paths; pick another",
        ));
    }
    Ok(())
}

pub(super) async fn first_user_status(
    State(state): State<AppState>,
) -> ApiResult<Json<FirstUserStatus>> {
    let store = state.store.clone();
    let exists = blocking(move || Ok(store.has_users()?)).await?;
    Ok(Json(FirstUserStatus {
        exists,
        setup_code_required: !exists && state.setup_code.is_some(),
    }))
}

async fn new_session(store: Arc<Store>, user: UserRecord) -> ApiResult<Session> {
    let now = Timestamp::now();
    let expires_at = now.saturating_add(SESSION_LIFETIME);
    let issued = auth::issue_token(
        TokenKind::Session {
            user: user.username.clone(),
        },
        now,
        Some(expires_at),
    );
    let record = issued.record;
    blocking(move || Ok(store.insert_token(&record, None)?)).await?;
    Ok(Session {
        user: user_view(&user),
        token: issued.text,
        expires_at,
    })
}

pub(super) async fn create_first_user(
    State(state): State<AppState>,
    ext: Extensions,
    ApiJson(body): ApiJson<Credentials>,
) -> ApiResult<(StatusCode, Json<Session>)> {
    check_username(&body.username)?;
    check_password(&body.password)?;
    state
        .throttle
        .attempt(source_ip(&ext), body.username.as_str())?;
    if let Some(expected) = &state.setup_code {
        let given = body.setup_code.as_deref().unwrap_or_default();
        if !auth::setup_code_matches(expected, given) {
            return Err(ApiError::forbidden(
                if given.is_empty() {
                    "creating the first user needs the setup code"
                } else {
                    "wrong setup code"
                },
                "`myco server` printed it at start (its listener is not on loopback); pass it with `myco login URL --first-user --setup-code CODE`",
            ));
        }
    }
    let store = state.store.clone();
    let user = state
        .throttle
        .hash(move || {
            if store.has_users()? {
                return Err(CreateFirstUserError::Exists.into());
            }
            let hash = auth::hash_password(&body.password)
                .map_err(|e| ApiError::internal("could not hash the password", e.to_string()))?;
            let user = UserRecord {
                username: body.username,
                password_hash: hash,
                admin: true,
                created_at: Timestamp::now(),
                disabled: false,
            };
            store.create_first_user(&user)?;
            Ok(user)
        })
        .await?;
    tracing::info!(user = %user.username, "first user created");
    let session = new_session(state.store.clone(), user).await?;
    Ok((StatusCode::CREATED, Json(session)))
}

pub(super) async fn login(
    State(state): State<AppState>,
    ext: Extensions,
    ApiJson(body): ApiJson<Credentials>,
) -> ApiResult<Json<Session>> {
    state
        .throttle
        .attempt(source_ip(&ext), body.username.as_str())?;
    let store = state.store.clone();
    let user = state
        .throttle
        .hash(move || {
            let user = store.user(body.username.as_str())?;
            let ok = auth::verify_password(
                user.as_ref().map(|u| u.password_hash.as_str()),
                &body.password,
            );
            Ok(user.filter(|_| ok))
        })
        .await?
        .ok_or_else(|| {
            ApiError::unauthorized(
                "wrong username or password",
                "check both; an admin can create users with `myco users create`",
            )
        })?;
    if user.disabled {
        return Err(disabled(&user.username));
    }
    Ok(Json(new_session(state.store.clone(), user).await?))
}

pub(super) async fn logout(State(state): State<AppState>, caller: Caller) -> ApiResult<StatusCode> {
    if !matches!(caller.token.kind, TokenKind::Session { .. }) {
        return Err(ApiError::bad_request(
            "this is an API token, not a login session",
            "revoke API tokens with `myco tokens rm NAME`",
        ));
    }
    let store = state.store.clone();
    let id = caller.token.id.clone();
    blocking(move || Ok(store.delete_token(&id)?)).await?;
    super::revoke_tokens(&state, vec![caller.token.id]);
    Ok(StatusCode::NO_CONTENT)
}

/// The address a request came from, for the login rate limits.
fn source_ip(ext: &Extensions) -> Option<std::net::IpAddr> {
    crate::http::peer_of(ext).map(|a| a.ip())
}

/// The 401 a disabled user gets, at login and for every token.
pub(super) fn disabled(username: &Name) -> ApiError {
    ApiError::unauthorized(
        format!("user {username} is disabled"),
        "ask an admin to enable it with `myco users enable NAME`",
    )
}

/// The user `{name}` names, for an admin acting on another user (`me`: the caller).
fn target_user(caller: &Caller, name: &str) -> ApiResult<Name> {
    if name == ME {
        return Ok(caller.user.username.clone());
    }
    path_name("username", name)
}

/// An admin may not lock themselves out: disabling or deleting oneself is refused.
fn not_self(caller: &Caller, target: &Name, what: &str) -> ApiResult<()> {
    if &caller.user.username == target {
        return Err(ApiError::bad_request(
            format!("you cannot {what} yourself"),
            "ask another admin",
        ));
    }
    Ok(())
}

/// Which of a user's tokens [`revoke_user_tokens`] ends.
enum Revocation {
    /// Every login session and API token, deleted.
    All,
    /// The login sessions but `keep` (the caller's own), deleted; API tokens stay.
    SessionsBut(Option<String>),
    /// The login sessions, deleted, and what the API tokens opened on the mesh
    /// closed; the tokens stay in the store (a disabled user's are refused, and
    /// work again once enabled).
    Disable,
}

/// Ends `target`'s tokens as `which` says and closes what they granted on the
/// mesh, in one revocation; returns how many tokens were deleted.
async fn revoke_user_tokens(
    state: &AppState,
    target: &Name,
    which: Revocation,
) -> ApiResult<usize> {
    let store = state.store.clone();
    let t = target.clone();
    let (deleted, kept) = blocking(move || {
        Ok(match which {
            Revocation::All => (store.delete_user_tokens(t.as_str())?, Vec::new()),
            Revocation::SessionsBut(keep) => (
                store.delete_user_sessions(t.as_str(), keep.as_deref())?,
                Vec::new(),
            ),
            Revocation::Disable => (
                store.delete_user_sessions(t.as_str(), None)?,
                store
                    .api_tokens(Some(&t))?
                    .into_iter()
                    .map(|k| k.id)
                    .collect(),
            ),
        })
    })
    .await?;
    let n = deleted.len();
    super::revoke_tokens(state, [deleted, kept].concat());
    Ok(n)
}

/// `POST /api/v1/users/{name}/disable` (admins): the user can no longer log in or
/// use any token; their sessions are deleted and what they opened on the mesh closed.
pub(super) async fn disable_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<api::User>> {
    caller.require_admin()?;
    let target = target_user(&caller, &name)?;
    not_self(&caller, &target, "disable")?;
    let store = state.store.clone();
    let t = target.clone();
    let user = blocking(move || Ok(store.update_user(t.as_str(), |u| u.disabled = true)?)).await?;
    revoke_user_tokens(&state, &target, Revocation::Disable).await?;
    tracing::info!(user = %target, by = %caller.user.username, "user disabled");
    Ok(Json(user_view(&user)))
}

/// `POST /api/v1/users/{name}/enable` (admins).
pub(super) async fn enable_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<api::User>> {
    caller.require_admin()?;
    let target = target_user(&caller, &name)?;
    let store = state.store.clone();
    let t = target.clone();
    let user = blocking(move || Ok(store.update_user(t.as_str(), |u| u.disabled = false)?)).await?;
    tracing::info!(user = %target, by = %caller.user.username, "user enabled");
    Ok(Json(user_view(&user)))
}

/// `DELETE /api/v1/users/{name}` (admins): refused while the user owns workspaces.
pub(super) async fn delete_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let target = target_user(&caller, &name)?;
    not_self(&caller, &target, "delete")?;
    let store = state.store.clone();
    let t = target.clone();
    let ids = blocking(move || Ok(store.delete_user(&t)?)).await?;
    super::revoke_tokens(&state, ids);
    tracing::info!(user = %target, by = %caller.user.username, "user deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/users/{name}/revoke`: deletes every session and API token of the
/// user (oneself, or anyone for an admin) and closes what they opened on the mesh.
pub(super) async fn revoke_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<api::Revoked>> {
    let target = target_user(&caller, &name)?;
    if target != caller.user.username {
        caller.require_admin()?;
        let store = state.store.clone();
        let t = target.clone();
        if blocking(move || Ok(store.user(t.as_str())?))
            .await?
            .is_none()
        {
            return Err(ApiError::not_found(format!("user {target} not found"), ""));
        }
    }
    let tokens = revoke_user_tokens(&state, &target, Revocation::All).await?;
    tracing::info!(user = %target, by = %caller.user.username, tokens, "sessions and tokens revoked");
    Ok(Json(api::Revoked { tokens }))
}

/// `PUT /api/v1/users/{name}/password`: users change their own (giving the old
/// one); admins set anyone's. Every other session of the user ends.
pub(super) async fn change_password(
    State(state): State<AppState>,
    ext: Extensions,
    caller: Caller,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<api::ChangePassword>,
) -> ApiResult<Json<api::Revoked>> {
    let target = target_user(&caller, &name)?;
    let own = target == caller.user.username;
    if own {
        // Checking the old password is a guess like a login's: the same budgets.
        state.throttle.attempt(source_ip(&ext), target.as_str())?;
    } else {
        caller.require_admin()?;
    }
    check_password(&body.password)?;
    let store = state.store.clone();
    let t = target.clone();
    let need_old = own.then(|| body.old_password.clone().unwrap_or_default());
    state
        .throttle
        .hash(move || {
            let user = store
                .user(t.as_str())?
                .ok_or_else(|| ApiError::not_found(format!("user {t} not found"), ""))?;
            if let Some(old) = need_old
                && !auth::verify_password(Some(&user.password_hash), &old)
            {
                return Err(ApiError::forbidden(
                    "the old password is wrong",
                    "give your current password to change it",
                ));
            }
            let hash = auth::hash_password(&body.password)
                .map_err(|e| ApiError::internal("could not hash the password", e.to_string()))?;
            store.update_user(t.as_str(), |u| u.password_hash = hash)?;
            Ok(())
        })
        .await?;
    // Whoever knew the old password may hold a session: end them all but this one.
    let keep = own.then(|| caller.token.id.clone());
    let tokens = revoke_user_tokens(&state, &target, Revocation::SessionsBut(keep)).await?;
    tracing::info!(user = %target, by = %caller.user.username, "password changed");
    Ok(Json(api::Revoked { tokens }))
}

pub(super) async fn me(caller: Caller) -> Json<api::User> {
    Json(user_view(&caller.user))
}

pub(super) async fn list_users(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<api::User>>> {
    caller.require_admin()?;
    let store = state.store.clone();
    let users = blocking(move || Ok(store.users()?)).await?;
    Ok(Json(users.iter().map(user_view).collect()))
}

pub(super) async fn create_user(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateUser>,
) -> ApiResult<(StatusCode, Json<api::User>)> {
    caller.require_admin()?;
    check_username(&body.username)?;
    check_password(&body.password)?;
    let store = state.store.clone();
    let user = state
        .throttle
        .hash(move || {
            if store.user(body.username.as_str())?.is_some() {
                return Err(CreateUserError::Exists(body.username).into());
            }
            let hash = auth::hash_password(&body.password)
                .map_err(|e| ApiError::internal("could not hash the password", e.to_string()))?;
            let user = UserRecord {
                username: body.username,
                password_hash: hash,
                admin: body.admin,
                created_at: Timestamp::now(),
                disabled: false,
            };
            store.create_user(&user)?;
            Ok(user)
        })
        .await?;
    tracing::info!(user = %user.username, admin = user.admin, by = %caller.user.username, "user created");
    Ok((StatusCode::CREATED, Json(user_view(&user))))
}
