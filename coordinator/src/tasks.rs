//! An owner for background tasks (iroh's `Router` shape): a `JoinSet` inside, so
//! dropping the owner aborts what it spawned, and a way to wait for them at shutdown.
//! Every `tokio::spawn` of the coordinator outside tests goes through one.

use std::future::Future;

use tokio::task::{AbortHandle, JoinError, JoinSet};

/// Tasks that live as long as their owner: dropped, it aborts them.
#[derive(Debug)]
#[must_use = "dropping a TaskGroup aborts its tasks"]
pub(crate) struct TaskGroup {
    /// What the tasks are, for the log when one panics.
    what: &'static str,
    set: JoinSet<()>,
}

impl TaskGroup {
    pub(crate) fn new(what: &'static str) -> Self {
        Self {
            what,
            set: JoinSet::new(),
        }
    }

    /// Runs `task` until it ends or the group stops.
    pub(crate) fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) -> AbortHandle {
        self.set.spawn(task)
    }

    /// Forgets the tasks that ended, logging any that panicked; a loop that spawns a
    /// task per connection calls it so the set holds only live ones.
    pub(crate) fn reap(&mut self) {
        while let Some(ended) = self.set.try_join_next() {
            self.ended(ended);
        }
    }

    /// Waits for the next task to end; `None` when there are none.
    ///
    /// # Cancel safety
    /// Cancel safe: a task that ended stays in the set until the next call.
    pub(crate) async fn join_next(&mut self) -> Option<()> {
        let ended = self.set.join_next().await?;
        self.ended(ended);
        Some(())
    }

    /// Waits until every task has ended by itself.
    ///
    /// # Cancel safety
    /// Cancel safe: the tasks not yet ended stay in the group.
    pub(crate) async fn join_all(&mut self) {
        while self.join_next().await.is_some() {}
    }

    /// Aborts every task and waits until they are gone.
    pub(crate) async fn shutdown(mut self) {
        self.set.abort_all();
        while let Some(ended) = self.set.join_next().await {
            self.ended(ended);
        }
    }

    /// A task aborted through its handle ended as asked; only a panic is news.
    fn ended(&self, ended: Result<(), JoinError>) {
        if let Err(e) = ended
            && e.is_panic()
        {
            tracing::error!(tasks = self.what, "a task panicked: {e}");
        }
    }
}
