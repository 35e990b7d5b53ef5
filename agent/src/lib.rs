//! The workspace agent (`myco agent`): it will hold the control channel to the
//! coordinator, serve SSH and port forwarding on the mesh, run startup and shutdown
//! scripts, and check app health. Nothing is here yet; the mesh issue brings it.
