//! Named API tokens of the caller: list, create (with a bounded lifetime), revoke.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use mesh::Timestamp;
use mesh::api::{CreateToken, CreatedToken, TokenInfo};

use super::callers::Caller;
use super::{AppState, blocking, path_name};
use crate::auth;
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::store::{TokenKind, TokenRecord};

/// Default and longest lifetime of a named API token.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

fn token_info(t: &TokenRecord) -> Option<TokenInfo> {
    match &t.kind {
        TokenKind::Api { user, name } => Some(TokenInfo {
            name: name.clone(),
            owner: user.clone(),
            created_at: t.created_at,
            expires_at: t.expires_at.unwrap_or(t.created_at),
        }),
        _ => None,
    }
}

pub(super) async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<TokenInfo>>> {
    let store = state.store.clone();
    let owner = caller.user.username.clone();
    let tokens = blocking(move || Ok(store.api_tokens(Some(&owner))?)).await?;
    Ok(Json(tokens.iter().filter_map(token_info).collect()))
}

pub(super) async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateToken>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    let lifetime = match body.lifetime_seconds {
        None => DEFAULT_TOKEN_LIFETIME,
        Some(0) => {
            return Err(ApiError::bad_request(
                "token lifetime must be positive",
                "give a lifetime such as 30d",
            ));
        }
        Some(s) if Duration::from_secs(s) > MAX_TOKEN_LIFETIME => {
            return Err(ApiError::bad_request(
                "token lifetime is too long",
                format!(
                    "the longest is {} days",
                    MAX_TOKEN_LIFETIME.as_secs() / 86400
                ),
            ));
        }
        Some(s) => Duration::from_secs(s),
    };
    let now = Timestamp::now();
    let issued = auth::issue_token(
        TokenKind::Api {
            user: caller.user.username.clone(),
            name: body.name,
        },
        now,
        Some(now.saturating_add(lifetime)),
    );
    let record = issued.record.clone();
    let store = state.store.clone();
    let max = Some(state.quotas.api_tokens_per_user);
    blocking(move || Ok(store.insert_token(&record, max)?)).await?;
    let info =
        token_info(&issued.record).ok_or_else(|| ApiError::internal("token kind mismatch", ""))?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            info,
            token: issued.text,
        }),
    ))
}

pub(super) async fn delete_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let name = path_name("token name", &name)?;
    let store = state.store.clone();
    let owner = caller.user.username.clone();
    let n = name.clone();
    let Some(id) = blocking(move || Ok(store.delete_api_token(&owner, &n)?)).await? else {
        return Err(ApiError::not_found(
            format!("token {name} not found"),
            "list your tokens with `myco tokens ls`",
        ));
    };
    super::revoke_tokens(&state, vec![id]);
    Ok(StatusCode::NO_CONTENT)
}
