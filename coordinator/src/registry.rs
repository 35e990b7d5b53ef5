//! The coordinator's in-memory view of the mesh: which agents hold a live control
//! channel and at what address, and which endpoint ids the relay admits.
//!
//! Nothing here is persisted: after a restart agents reconnect and republish, and
//! clients ask for new tickets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use iroh::{EndpointAddr, EndpointId};
use mesh::Timestamp;

/// What the coordinator pushes to one agent's control channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// Close the channel with this reason (token rotated, workspace deleted).
    Close(String),
    /// Tell the agent to close mesh connections opened with tickets issued under
    /// these tokens.
    Revoke { token_ids: Vec<String> },
}

/// Pushes one channel may have waiting; a channel that falls this far behind is
/// closed rather than let the queue grow.
const PUSH_QUEUE: usize = 64;

/// An agent with a live control channel.
#[derive(Debug, Clone)]
pub struct LiveAgent {
    /// Which control channel this is; a reconnect gets a new one, so a late close
    /// of the old channel does not remove the new one.
    pub channel: u64,
    pub connected_at: Timestamp,
    /// Set once the agent published its address.
    pub addr: Option<EndpointAddr>,
    push: tokio::sync::mpsc::Sender<Push>,
}

/// Who a client endpoint was admitted to the relay for, and until when.
#[derive(Debug, Clone)]
struct ClientGrant {
    until: Timestamp,
    /// The token (public id) the ticket was issued under.
    token_id: String,
}

#[derive(Debug, Default)]
struct Inner {
    next_channel: u64,
    /// agent id -> live state
    agents: HashMap<String, LiveAgent>,
    /// client endpoint id -> admitted to the relay until, for whom
    clients: HashMap<EndpointId, ClientGrant>,
    /// live agent endpoint id -> agent id: the relay's admission check per
    /// connection is one lookup, not a scan of every agent.
    endpoints: HashMap<EndpointId, String>,
}

impl Inner {
    fn forget_endpoint(&mut self, agent_id: &str) {
        if let Some(old) = self.agents.get(agent_id).and_then(|a| a.addr.as_ref())
            && self.endpoints.get(&old.id).is_some_and(|a| a == agent_id)
        {
            self.endpoints.remove(&old.id);
        }
    }
}

/// Shared, cheap to clone.
#[derive(Debug, Clone)]
pub struct MeshRegistry {
    inner: Arc<Mutex<Inner>>,
    /// Bumped after every address an agent publishes, so that a connect waiting for
    /// an agent to come up wakes instead of polling.
    addresses: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for MeshRegistry {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            addresses: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

impl MeshRegistry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain maps behind, still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver that sees a change after every address an agent publishes (any
    /// agent's: a waiter looks again at the one it waits for).
    pub fn address_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.addresses.subscribe()
    }

    /// Registers a new control channel of `agent_id`; returns its channel number and
    /// the receiver of what the coordinator pushes to it.
    pub fn agent_connected(
        &self,
        agent_id: &str,
        now: Timestamp,
    ) -> (u64, tokio::sync::mpsc::Receiver<Push>) {
        let (push, pushed) = tokio::sync::mpsc::channel(PUSH_QUEUE);
        let mut inner = self.lock();
        inner.next_channel += 1;
        let channel = inner.next_channel;
        inner.forget_endpoint(agent_id);
        inner.agents.insert(
            agent_id.to_owned(),
            LiveAgent {
                channel,
                connected_at: now,
                addr: None,
                push,
            },
        );
        (channel, pushed)
    }

    /// Pushes `push` to each of `agent_ids` that has a live channel. A channel whose
    /// queue is full is told to close instead (it reconnects and starts afresh).
    /// Returns the endpoint ids of the agents reached.
    pub fn push(&self, agent_ids: &[String], push: &Push) -> Vec<EndpointId> {
        let mut inner = self.lock();
        let mut reached = Vec::new();
        for id in agent_ids {
            let Some(a) = inner.agents.get_mut(id) else {
                continue;
            };
            if let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) =
                a.push.try_send(push.clone())
            {
                tracing::warn!(agent = %id, "agent's push queue is full; closing its channel");
                // Dropping the channel's only sender ends its loop once it has read
                // what is queued.
                a.push = tokio::sync::mpsc::channel(1).0;
            }
            if let Some(addr) = &a.addr {
                reached.push(addr.id);
            }
        }
        reached
    }

    /// Ids of the agents with a live channel now.
    pub fn live_agent_ids(&self) -> Vec<String> {
        self.lock().agents.keys().cloned().collect()
    }

    /// Records the address an agent published on `channel` (its key proven by the
    /// caller). Returns false, recording nothing, when another live agent holds that
    /// endpoint id.
    pub fn agent_addr(&self, agent_id: &str, channel: u64, addr: EndpointAddr) -> bool {
        let mut inner = self.lock();
        if inner.endpoints.get(&addr.id).is_some_and(|a| a != agent_id) {
            return false;
        }
        if inner
            .agents
            .get(agent_id)
            .is_some_and(|a| a.channel == channel)
        {
            inner.forget_endpoint(agent_id);
            inner.endpoints.insert(addr.id, agent_id.to_owned());
            if let Some(a) = inner.agents.get_mut(agent_id) {
                a.addr = Some(addr);
            }
            drop(inner);
            self.addresses.send_modify(|n| *n = n.wrapping_add(1));
        }
        true
    }

    /// Forgets the agent if `channel` is still its current control channel; returns
    /// whether it was.
    pub fn agent_disconnected(&self, agent_id: &str, channel: u64) -> bool {
        let mut inner = self.lock();
        let current = inner
            .agents
            .get(agent_id)
            .is_some_and(|a| a.channel == channel);
        if current {
            inner.forget_endpoint(agent_id);
            inner.agents.remove(agent_id);
        }
        current
    }

    pub fn live(&self, agent_id: &str) -> Option<LiveAgent> {
        self.lock().agents.get(agent_id).cloned()
    }

    /// Admits a client endpoint to the relay until `until` (its ticket's expiry), for
    /// a user asking with token `token_id`.
    pub fn allow_client(&self, id: EndpointId, until: Timestamp, now: Timestamp, token_id: &str) {
        let mut inner = self.lock();
        inner.clients.retain(|_, g| g.until > now);
        let until = inner.clients.get(&id).map_or(until, |g| g.until.max(until));
        inner.clients.insert(
            id,
            ClientGrant {
                until,
                token_id: token_id.to_owned(),
            },
        );
    }

    /// Withdraws the relay admission of clients admitted under one of `token_ids`;
    /// returns their endpoint ids, for the relay to disconnect.
    pub fn revoke_clients(&self, token_ids: &[String]) -> Vec<EndpointId> {
        let mut inner = self.lock();
        let gone: Vec<EndpointId> = inner
            .clients
            .iter()
            .filter(|(_, g)| token_ids.contains(&g.token_id))
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            inner.clients.remove(id);
        }
        gone
    }

    /// Whether the relay admits `id` at `now`: a live agent's endpoint, or a client
    /// holding an unexpired ticket.
    pub fn relay_allowed(&self, id: EndpointId, now: Timestamp) -> bool {
        let inner = self.lock();
        inner.clients.get(&id).is_some_and(|g| g.until > now) || inner.endpoints.contains_key(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iroh::SecretKey;

    fn id(n: u8) -> EndpointId {
        SecretKey::from_bytes(&[n; 32]).public()
    }

    #[test]
    fn reconnect_race_keeps_the_new_channel() {
        let r = MeshRegistry::default();
        let now = Timestamp::from_unix_millis(0);
        let (old, _) = r.agent_connected("a", now);
        let (new, _) = r.agent_connected("a", now);
        assert!(r.agent_addr("a", new, EndpointAddr::new(id(1))));
        r.agent_disconnected("a", old);
        assert!(r.live("a").is_some());
        assert!(r.relay_allowed(id(1), now));
        r.agent_disconnected("a", new);
        assert!(r.live("a").is_none());
        assert!(!r.relay_allowed(id(1), now));
    }

    #[test]
    fn one_live_endpoint_per_agent() {
        let r = MeshRegistry::default();
        let now = Timestamp::from_unix_millis(0);
        let (a, _) = r.agent_connected("a", now);
        let (b, _) = r.agent_connected("b", now);
        assert!(r.agent_addr("a", a, EndpointAddr::new(id(1))));
        assert!(!r.agent_addr("b", b, EndpointAddr::new(id(1))));
        assert!(r.live("b").unwrap().addr.is_none());
        assert_eq!(r.live("a").unwrap().addr.unwrap().id, id(1));
    }

    #[test]
    fn clients_are_admitted_until_their_ticket_expires() {
        let r = MeshRegistry::default();
        let t0 = Timestamp::from_unix_millis(1000);
        r.allow_client(id(2), Timestamp::from_unix_millis(2000), t0, "t1");
        assert!(r.relay_allowed(id(2), Timestamp::from_unix_millis(1999)));
        assert!(!r.relay_allowed(id(2), Timestamp::from_unix_millis(2000)));
        assert!(!r.relay_allowed(id(3), t0));
    }

    #[test]
    fn revoking_tokens_withdraws_relay_admission() {
        let r = MeshRegistry::default();
        let t0 = Timestamp::from_unix_millis(1000);
        let later = Timestamp::from_unix_millis(9000);
        r.allow_client(id(2), later, t0, "t1");
        r.allow_client(id(3), later, t0, "t2");
        r.allow_client(id(4), later, t0, "t3");
        assert_eq!(r.revoke_clients(&["t1".into()]), vec![id(2)]);
        assert!(!r.relay_allowed(id(2), t0));
        assert!(r.relay_allowed(id(3), t0));
        let mut both = r.revoke_clients(&["t2".into(), "t3".into()]);
        both.sort();
        let mut want = vec![id(3), id(4)];
        want.sort();
        assert_eq!(both, want);
    }

    #[test]
    fn pushes_reach_the_current_channel() {
        let r = MeshRegistry::default();
        let now = Timestamp::from_unix_millis(0);
        let (_, mut old) = r.agent_connected("a", now);
        let (new, mut rx) = r.agent_connected("a", now);
        assert!(r.agent_addr("a", new, EndpointAddr::new(id(1))));
        let reached = r.push(&["a".into(), "gone".into()], &Push::Close("bye".into()));
        assert_eq!(reached, vec![id(1)]);
        assert_eq!(rx.try_recv().unwrap(), Push::Close("bye".into()));
        // The replaced channel's queue is closed, so its loop ends too.
        assert!(matches!(
            old.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)
        ));
    }
}
