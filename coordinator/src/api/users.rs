//! Users and login sessions: the first user (an admin), login, logout, `me`, and the
//! admin's list and create.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use mesh::api::{self, CreateUser, Credentials, FirstUserStatus, Session};
use mesh::{Name, Timestamp};

use super::callers::Caller;
use super::{AppState, ME, blocking};
use crate::auth;
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::store::{Store, StoreError, TokenKind, UserRecord};

/// How long a login session lasts.
const SESSION_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

fn user_view(u: &UserRecord) -> api::User {
    api::User {
        username: u.username.clone(),
        admin: u.admin,
        created_at: u.created_at,
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
    Ok(Json(FirstUserStatus { exists }))
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
    blocking(move || Ok(store.insert_token(&record)?)).await?;
    Ok(Session {
        user: user_view(&user),
        token: issued.text,
        expires_at,
    })
}

pub(super) async fn create_first_user(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Credentials>,
) -> ApiResult<(StatusCode, Json<Session>)> {
    check_username(&body.username)?;
    check_password(&body.password)?;
    let store = state.store.clone();
    let user = blocking(move || {
        if store.has_users()? {
            return Err(StoreError::FirstUserExists.into());
        }
        let hash = auth::hash_password(&body.password)
            .map_err(|e| ApiError::internal("could not hash the password", e.to_string()))?;
        let user = UserRecord {
            username: body.username,
            password_hash: hash,
            admin: true,
            created_at: Timestamp::now(),
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
    ApiJson(body): ApiJson<Credentials>,
) -> ApiResult<Json<Session>> {
    let store = state.store.clone();
    let user = blocking(move || {
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
    let id = caller.token.id;
    blocking(move || Ok(store.delete_token(&id)?)).await?;
    Ok(StatusCode::NO_CONTENT)
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
    let user = blocking(move || {
        if store.user(body.username.as_str())?.is_some() {
            return Err(StoreError::Conflict(format!("user {}", body.username)).into());
        }
        let hash = auth::hash_password(&body.password)
            .map_err(|e| ApiError::internal("could not hash the password", e.to_string()))?;
        let user = UserRecord {
            username: body.username,
            password_hash: hash,
            admin: body.admin,
            created_at: Timestamp::now(),
        };
        store.create_user(&user)?;
        Ok(user)
    })
    .await?;
    tracing::info!(user = %user.username, admin = user.admin, by = %caller.user.username, "user created");
    Ok((StatusCode::CREATED, Json(user_view(&user))))
}
