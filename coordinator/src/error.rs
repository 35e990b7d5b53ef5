//! `ApiError`, how every failed request is answered: JSON `{"message", "detail"}` with a
//! fitting status; `ApiJson`, a `Json` extractor whose rejections are such errors.
//!
//! Apart from `api` so the control channel and the relay answer failures the same way
//! without importing the API's routes.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mesh::api::ErrorBody;

use crate::store::{
    CancelBuildError, ClaimJobError, CreateFirstUserError, CreateProvisionerKeyError,
    CreateUserError, CreateWorkspaceError, DeleteTemplateError, DeleteUserError, FinishBuildError,
    InsertTokenError, QueueBuildError, QuotaReached, ReplaceAgentTokensError,
    RotateAgentTokenError, StoreError, UpdateUserError,
};

/// An API failure, answered as JSON `{"message", "detail"}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    detail: String,
    /// Sent as `Retry-After` (whole seconds, at least one) with a `429` or `503`.
    retry_after: Option<std::time::Duration>,
}

/// `message: detail`, for logs of work done off a request (builds).
impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.detail.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.message, self.detail)
        }
    }
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        message: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            detail: detail.into(),
            retry_after: None,
        }
    }
    /// `429 Too Many Requests` with `Retry-After: wait`.
    pub(crate) fn too_many_requests(
        message: impl Into<String>,
        detail: impl Into<String>,
        wait: std::time::Duration,
    ) -> Self {
        Self {
            retry_after: Some(wait),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, message, detail)
        }
    }
    #[cfg(test)]
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }
    #[cfg(test)]
    pub(crate) fn message(&self) -> &str {
        &self.message
    }
    #[cfg(test)]
    pub(crate) fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after
    }
    pub(crate) fn bad_request(message: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, detail)
    }
    pub(crate) fn unauthorized(message: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message, detail)
    }
    pub(crate) fn forbidden(message: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message, detail)
    }
    pub(crate) fn not_found(message: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message, detail)
    }
    pub(crate) fn conflict(message: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message, detail)
    }
    pub(crate) fn internal(message: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message, detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, message = %self.message, detail = %self.detail, "request failed");
        }
        let body = ErrorBody {
            message: self.message,
            detail: self.detail,
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            // Whole seconds, rounded up: a client that waits that long gets in.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.max(1).into());
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::internal("the coordinator's store failed", e.to_string())
    }
}

impl From<QuotaReached> for ApiError {
    fn from(QuotaReached { what, owner, max }: QuotaReached) -> Self {
        Self::forbidden(
            format!("{owner} holds {max} {what}, the most allowed"),
            "delete some first, or ask the operator to raise the quota (`myco server --help`, \"quota\")",
        )
    }
}

impl From<InsertTokenError> for ApiError {
    fn from(e: InsertTokenError) -> Self {
        match e {
            InsertTokenError::Exists { owner, name } => Self::conflict(
                format!("token {name} of {owner} already exists"),
                "pick another name",
            ),
            InsertTokenError::Quota(q) => q.into(),
            InsertTokenError::Store(e) => e.into(),
        }
    }
}

impl From<CreateWorkspaceError> for ApiError {
    fn from(e: CreateWorkspaceError) -> Self {
        match e {
            CreateWorkspaceError::Exists(key) => Self::conflict(
                format!("workspace {key} already exists"),
                "pick another name",
            ),
            CreateWorkspaceError::Quota(q) => q.into(),
            CreateWorkspaceError::Build(e) => e.into(),
            CreateWorkspaceError::Store(e) => e.into(),
        }
    }
}

impl From<QueueBuildError> for ApiError {
    fn from(e: QueueBuildError) -> Self {
        match e {
            e @ QueueBuildError::NoTemplate(_) => Self::conflict(
                e.to_string(),
                "create it with `myco create WS --template NAME` to have its machine built",
            ),
            e @ QueueBuildError::Busy { .. } => {
                Self::conflict(e.to_string(), "`myco builds WS` shows it")
            }
            e @ (QueueBuildError::WorkspaceNotFound(_) | QueueBuildError::TemplateNotFound(_)) => {
                Self::not_found(e.to_string(), "")
            }
            QueueBuildError::Store(e) => e.into(),
        }
    }
}

impl From<DeleteTemplateError> for ApiError {
    fn from(e: DeleteTemplateError) -> Self {
        match e {
            e @ DeleteTemplateError::InUse { .. } => Self::conflict(
                e.to_string(),
                "`myco ls --all` lists the workspaces and their templates",
            ),
            DeleteTemplateError::Store(e) => e.into(),
        }
    }
}

impl From<CancelBuildError> for ApiError {
    fn from(e: CancelBuildError) -> Self {
        match e {
            e @ CancelBuildError::NotRunning(_) => Self::not_found(e.to_string(), ""),
            CancelBuildError::Finish(e) => e.into(),
            CancelBuildError::Store(e) => e.into(),
        }
    }
}

impl From<CreateProvisionerKeyError> for ApiError {
    fn from(e: CreateProvisionerKeyError) -> Self {
        match e {
            e @ CreateProvisionerKeyError::Exists(_) => {
                Self::conflict(e.to_string(), "pick another name")
            }
            CreateProvisionerKeyError::Store(e) => e.into(),
        }
    }
}

impl From<RotateAgentTokenError> for ApiError {
    fn from(e: RotateAgentTokenError) -> Self {
        match e {
            e @ (RotateAgentTokenError::WorkspaceNotFound(_)
            | RotateAgentTokenError::AgentNotFound { .. }) => Self::not_found(e.to_string(), ""),
            RotateAgentTokenError::Store(e) => e.into(),
        }
    }
}

impl From<ClaimJobError> for ApiError {
    fn from(e: ClaimJobError) -> Self {
        match e {
            e @ (ClaimJobError::WorkspaceNotFound(_)
            | ClaimJobError::BuildNotFound(_)
            | ClaimJobError::TemplateNotFound(_)) => Self::not_found(e.to_string(), ""),
            ClaimJobError::Store(e) => e.into(),
        }
    }
}

impl From<ReplaceAgentTokensError> for ApiError {
    fn from(e: ReplaceAgentTokensError) -> Self {
        match e {
            e @ ReplaceAgentTokensError::WorkspaceNotFound(_) => Self::not_found(e.to_string(), ""),
            ReplaceAgentTokensError::Store(e) => e.into(),
        }
    }
}

impl From<FinishBuildError> for ApiError {
    fn from(e: FinishBuildError) -> Self {
        match e {
            e @ FinishBuildError::BuildNotFound(_) => Self::not_found(e.to_string(), ""),
            FinishBuildError::Store(e) => e.into(),
        }
    }
}

impl From<CreateFirstUserError> for ApiError {
    fn from(e: CreateFirstUserError) -> Self {
        match e {
            CreateFirstUserError::Exists => Self::conflict(
                "the first user has already been created",
                "log in with `myco login URL`, or ask an admin to create your user",
            ),
            CreateFirstUserError::Store(e) => e.into(),
        }
    }
}

impl From<CreateUserError> for ApiError {
    fn from(e: CreateUserError) -> Self {
        match e {
            CreateUserError::Exists(user) => {
                Self::conflict(format!("user {user} already exists"), "pick another name")
            }
            CreateUserError::Store(e) => e.into(),
        }
    }
}

impl From<UpdateUserError> for ApiError {
    fn from(e: UpdateUserError) -> Self {
        match e {
            e @ UpdateUserError::NotFound(_) => Self::not_found(e.to_string(), ""),
            UpdateUserError::Store(e) => e.into(),
        }
    }
}

impl From<DeleteUserError> for ApiError {
    fn from(e: DeleteUserError) -> Self {
        match e {
            DeleteUserError::OwnsWorkspaces(user) => Self::conflict(
                format!("user {user} still owns workspaces"),
                format!(
                    "delete them first (`myco ls --all`, `myco delete {user}/WS`), or disable the user instead"
                ),
            ),
            e @ DeleteUserError::NotFound(_) => Self::not_found(e.to_string(), ""),
            DeleteUserError::Store(e) => e.into(),
        }
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Request bodies larger than this are refused with 413.
pub(crate) const MAX_BODY_BYTES: usize = 1024 * 1024;

/// `Json<T>` whose rejections are JSON errors: 400 for a body that is not the JSON we
/// expect, 413 for one over [`MAX_BODY_BYTES`], 415 without a JSON content type.
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let detail = rejection.body_text();
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {MAX_BODY_BYTES} bytes"),
            detail,
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "request body must be JSON",
            "send the header Content-Type: application/json",
        ),
        _ => ApiError::bad_request("request body is not valid JSON for this endpoint", detail),
    }
}
