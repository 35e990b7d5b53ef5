//! The workspace's one way to print an error for a person: its chain on one line
//! ([`error_chain`], what every CLI error line and logged failure uses) or only its
//! innermost cause ([`root_cause`], for a message that names what failed itself).
//!
//! Both are `netcheck`'s: it sits below `mesh` and prints chains in its report, so the
//! code lives there and this module is where the crates above it reach it.

pub use netcheck::{error_chain, root_cause};
