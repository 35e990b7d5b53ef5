//! Network diagnostics for `myco netcheck` and the agent: UDP reachability, the public
//! address and whether its mapping varies by destination, port-mapping protocols and
//! relay latency. It knows nothing of the coordinator beyond the probe targets it is
//! given. Nothing is here yet; the netcheck issue brings it.
