//! The coordinator's in-memory view of the mesh: which agents hold a live control
//! channel and at what address, and which endpoint ids the relay admits.
//!
//! Nothing here is persisted: after a restart agents reconnect and republish, and
//! clients ask for new tickets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use iroh::{EndpointAddr, EndpointId};
use mesh::Timestamp;

/// An agent with a live control channel.
#[derive(Debug, Clone)]
pub struct LiveAgent {
    /// Which control channel this is; a reconnect gets a new one, so a late close
    /// of the old channel does not remove the new one.
    pub channel: u64,
    pub connected_at: Timestamp,
    /// Set once the agent published its address.
    pub addr: Option<EndpointAddr>,
}

#[derive(Debug, Default)]
struct Inner {
    next_channel: u64,
    /// agent id -> live state
    agents: HashMap<String, LiveAgent>,
    /// client endpoint id -> admitted to the relay until
    clients: HashMap<EndpointId, Timestamp>,
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
#[derive(Debug, Clone, Default)]
pub struct MeshRegistry(Arc<Mutex<Inner>>);

impl MeshRegistry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain maps behind, still usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new control channel of `agent_id`; returns its channel number.
    pub fn agent_connected(&self, agent_id: &str, now: Timestamp) -> u64 {
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
            },
        );
        channel
    }

    /// Records the address an agent published on `channel`.
    pub fn agent_addr(&self, agent_id: &str, channel: u64, addr: EndpointAddr) {
        let mut inner = self.lock();
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
        }
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

    /// Admits a client endpoint to the relay until `until` (its ticket's expiry).
    pub fn allow_client(&self, id: EndpointId, until: Timestamp, now: Timestamp) {
        let mut inner = self.lock();
        inner.clients.retain(|_, t| *t > now);
        let e = inner.clients.entry(id).or_insert(until);
        *e = (*e).max(until);
    }

    /// Whether the relay admits `id` at `now`: a live agent's endpoint, or a client
    /// holding an unexpired ticket.
    pub fn relay_allowed(&self, id: EndpointId, now: Timestamp) -> bool {
        let inner = self.lock();
        inner.clients.get(&id).is_some_and(|t| *t > now) || inner.endpoints.contains_key(&id)
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
        let old = r.agent_connected("a", now);
        let new = r.agent_connected("a", now);
        r.agent_addr("a", new, EndpointAddr::new(id(1)));
        r.agent_disconnected("a", old);
        assert!(r.live("a").is_some());
        assert!(r.relay_allowed(id(1), now));
        r.agent_disconnected("a", new);
        assert!(r.live("a").is_none());
        assert!(!r.relay_allowed(id(1), now));
    }

    #[test]
    fn clients_are_admitted_until_their_ticket_expires() {
        let r = MeshRegistry::default();
        let t0 = Timestamp::from_unix_millis(1000);
        r.allow_client(id(2), Timestamp::from_unix_millis(2000), t0);
        assert!(r.relay_allowed(id(2), Timestamp::from_unix_millis(1999)));
        assert!(!r.relay_allowed(id(2), Timestamp::from_unix_millis(2000)));
        assert!(!r.relay_allowed(id(3), t0));
    }
}
