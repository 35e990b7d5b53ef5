//! Per-user quotas, so one user (or a script with their token) cannot fill the
//! store: workspaces per user, agents per workspace, named API tokens per user.
//! Admins are exempt from the workspace count (they run load tests and shared
//! workspaces); every other quota binds everyone. The store counts inside the write
//! that would exceed it, so concurrent creates cannot slip past.

/// What one user may hold; see `myco server --help`.
#[derive(Debug, Clone, Copy)]
pub struct Quotas {
    /// Workspaces a user who is not an admin may own.
    pub workspaces_per_user: usize,
    /// Agents one workspace may have.
    pub agents_per_workspace: usize,
    /// Named API tokens a user may hold (login sessions are not counted).
    pub api_tokens_per_user: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            workspaces_per_user: 100,
            agents_per_workspace: 64,
            api_tokens_per_user: 100,
        }
    }
}
