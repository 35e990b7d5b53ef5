//! Who is calling: `Caller`, the user behind a bearer token, and `AgentCaller`, the
//! agent behind an agent token; both axum extractors that answer 401 on failure.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use mesh::Timestamp;

use super::{AppState, blocking};
use crate::auth;
use crate::error::{ApiError, ApiResult};
use crate::store::{TokenKind, TokenRecord, UserRecord};

/// The token of an `Authorization` header value `Bearer <token>`, the one parser of
/// every extractor here. The scheme is case-insensitive (RFC 7235 section 2.1, which
/// RFC 6750 keeps) and spaces around the token are not part of it. `None` for another
/// scheme or no token.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The authenticated user behind a request's `Authorization: Bearer` token.
pub(crate) struct Caller {
    pub(crate) user: UserRecord,
    pub(crate) token: TokenRecord,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "missing API token",
                    "send Authorization: Bearer <token>; run `myco login URL` to get one",
                )
            })?
            .to_str()
            .map_err(|_| ApiError::unauthorized("malformed Authorization header", ""))?;
        let text = bearer_token(header)
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "Authorization header is not a bearer token",
                    "send Authorization: Bearer <token>",
                )
            })?
            .to_owned();
        let invalid = || {
            ApiError::unauthorized(
                "invalid API token",
                "the token is malformed, revoked or unknown; run `myco login URL` again",
            )
        };
        let store = state.store.clone();
        let (token, user) = blocking(move || {
            let Some(token) = auth::find_token(&store, &text)? else {
                return Ok((None, None));
            };
            let user = match &token.kind {
                TokenKind::Session { user } | TokenKind::Api { user, .. } => {
                    store.user(user.as_str())?
                }
                TokenKind::Agent { .. } | TokenKind::Provisioner { .. } => None,
            };
            Ok((Some(token), user))
        })
        .await?;
        let token = token.ok_or_else(invalid)?;
        if let Some(exp) = token.expires_at
            && exp <= Timestamp::now()
        {
            return Err(ApiError::unauthorized(
                "API token expired",
                format!("it expired at {exp}; run `myco login URL` or create a new token"),
            ));
        }
        let user = user.ok_or_else(|| {
            ApiError::unauthorized(
                "this token does not belong to a user",
                "agent tokens are only for `myco agent`",
            )
        })?;
        if user.disabled {
            return Err(super::users::disabled(&user.username));
        }
        Ok(Caller { user, token })
    }
}

impl Caller {
    pub(crate) fn require_admin(&self) -> ApiResult<()> {
        if self.user.admin {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "only admins may do this",
                format!("user {} is not an admin", self.user.username),
            ))
        }
    }
}

/// The agent behind a request's agent token.
pub(crate) struct AgentCaller {
    pub(crate) agent_id: String,
    pub(crate) workspace_id: String,
    /// `owner/workspace.agent`
    pub(crate) target: String,
    /// What the agent should run and check, from its workspace's spec.
    pub(crate) manifest: mesh::control::Manifest,
}

impl FromRequestParts<AppState> for AgentCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let invalid = || {
            ApiError::unauthorized(
                "invalid agent token",
                "the token is malformed, rotated or its workspace deleted; get a new one with `myco rotate-agent-token WS.AGENT`",
            )
        };
        let text = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(bearer_token)
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "missing agent token",
                    "send Authorization: Bearer <agent token>",
                )
            })?;
        let text = text.to_owned();
        let store = state.store.clone();
        let found = blocking(move || {
            let Some(token) = auth::find_token(&store, &text)? else {
                return Ok(None);
            };
            let TokenKind::Agent {
                workspace_id,
                agent_id,
            } = token.kind
            else {
                return Ok(None);
            };
            Ok(store
                .workspace_by_id(&workspace_id)?
                .map(|ws| (agent_id, ws)))
        })
        .await?;
        let (agent_id, ws) = found.ok_or_else(invalid)?;
        let agent = ws
            .agents
            .iter()
            .find(|a| a.id == agent_id)
            .ok_or_else(invalid)?;
        Ok(AgentCaller {
            target: format!("{}/{}.{}", ws.owner, ws.name, agent.name),
            manifest: mesh::control::Manifest {
                apps: agent.apps.clone(),
                startup_script: agent.startup_script.clone(),
                shutdown_script: agent.shutdown_script.clone(),
                metadata: agent.metadata.clone(),
            },
            agent_id,
            workspace_id: ws.id.clone(),
        })
    }
}

/// An external provisioner: the name of its key (`myco provisioner-keys create`).
pub(crate) struct ProvisionerCaller {
    pub(crate) name: mesh::Name,
}

impl FromRequestParts<AppState> for ProvisionerCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let invalid = || {
            ApiError::unauthorized(
                "invalid provisioner key",
                "create one with `myco provisioner-keys create NAME` (admins) and pass it as MYCO_PROVISIONER_KEY",
            )
        };
        let text = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(bearer_token)
            .ok_or_else(invalid)?
            .to_owned();
        let store = state.store.clone();
        let found = blocking(move || {
            Ok(auth::find_token(&store, &text)?.and_then(|t| match t.kind {
                TokenKind::Provisioner { name } => Some(name),
                _ => None,
            }))
        })
        .await?;
        Ok(ProvisionerCaller {
            name: found.ok_or_else(invalid)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER abc"), Some("abc"));
        assert_eq!(bearer_token("bEaReR abc"), Some("abc"));
    }

    #[test]
    fn spaces_around_the_token_are_not_part_of_it() {
        assert_eq!(bearer_token("Bearer   abc"), Some("abc"));
        assert_eq!(bearer_token("  Bearer abc  "), Some("abc"));
        assert_eq!(bearer_token("Bearer abc\t"), Some("abc"));
    }

    #[test]
    fn no_token_is_none() {
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer    "), None);
        assert_eq!(bearer_token(""), None);
    }

    #[test]
    fn other_schemes_are_none() {
        assert_eq!(bearer_token("Basic YWxpY2U6cHc="), None);
        assert_eq!(bearer_token("Token abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
        assert_eq!(bearer_token("Bearer-x abc"), None);
        assert_eq!(bearer_token("abc"), None);
    }
}
