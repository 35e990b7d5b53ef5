//! The tasks one SSH connection runs beside russh's session loop (a command's input and
//! output, forwarded connections and their listeners, the SFTP session), held in one
//! `JoinSet` by the connection's handler, so none outlives the connection.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::task::{AbortHandle, JoinSet};

/// Every task of one SSH connection. Its owner is the connection's handler
/// ([`super::SshConnection`]), which russh drops when the session loop ends; dropping
/// the set aborts what still runs.
#[derive(Default)]
pub(super) struct ConnectionTasks(Arc<Mutex<JoinSet<()>>>);

impl ConnectionTasks {
    /// Starts `task` as one of the connection's.
    pub(super) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) -> AbortHandle {
        spawn_into(&self.0, task)
    }

    /// A way for the connection's own tasks (a listener) to start more of them.
    pub(super) fn spawner(&self) -> TaskSpawner {
        TaskSpawner(Arc::downgrade(&self.0))
    }
}

/// Starts tasks in a connection's [`ConnectionTasks`] from inside one of its tasks. It
/// holds the set weakly: a task holding it strongly would keep the set, and so itself,
/// alive after the connection ends.
#[derive(Clone)]
pub(super) struct TaskSpawner(Weak<Mutex<JoinSet<()>>>);

impl TaskSpawner {
    /// Starts `task` as one of the connection's; does nothing once it has ended.
    pub(super) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        if let Some(set) = self.0.upgrade() {
            spawn_into(&set, task);
        }
    }
}

fn spawn_into(
    set: &Mutex<JoinSet<()>>,
    task: impl Future<Output = ()> + Send + 'static,
) -> AbortHandle {
    let mut set = set.lock().unwrap_or_else(PoisonError::into_inner);
    // Finished tasks are reaped as new ones come, so a long connection's set holds
    // only what runs.
    while let Some(done) = set.try_join_next() {
        if let Err(e) = done
            && e.is_panic()
        {
            tracing::warn!("a task of an SSH connection panicked: {e}");
        }
    }
    set.spawn(task)
}

/// Aborts its task when dropped: a listener that lasts as long as its forward.
pub(super) struct TaskGuard(pub(super) AbortHandle);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_end_with_the_connection_and_spawners_do_nothing_after() {
        let tasks = ConnectionTasks::default();
        let spawner = tasks.spawner();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        drop(tasks);
        // The task was aborted: its sender is dropped without sending.
        assert!(rx.await.is_err());
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        spawner.spawn(async move {
            let _ = tx.send(());
        });
        tokio::task::yield_now().await;
        assert!(
            rx.try_recv().is_err(),
            "nothing runs once the connection ended"
        );
    }
}
