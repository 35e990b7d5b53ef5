//! What an agent may send on its control channel: the bounds the agent keeps to on
//! its own side, and [`check_agent_message`], which the coordinator applies to every
//! message as if it came from an attacker (it may: agent tokens live inside
//! workspaces). Pure: a message and the agent's manifest in, a verdict out.

use crate::api::{LogLine, METADATA_VALUE_MAX};
use crate::control::{AgentMessage, Manifest};

/// Longest script output line kept, in bytes; the agent cuts longer ones.
pub const LOG_LINE_MAX: usize = 16 * 1024;
/// Most log lines in one `Logs` message.
pub const LOG_BATCH_LINES: usize = 100;
/// Most bytes of log text in one `Logs` message.
pub const LOG_BATCH_BYTES: usize = 1024 * 1024;
/// Longest reason a metadata item's failure carries.
pub const METADATA_ERROR_MAX: usize = 1024;
/// Most direct addresses one `Addr` may name (a host has a handful of interfaces).
pub const ADDRS_MAX: usize = 64;
/// Most relays a stats or netcheck report may name.
pub const RELAYS_MAX: usize = 16;
/// Longest URL or free-text field of a stats or netcheck report.
pub const TEXT_MAX: usize = 2048;
/// Most failures one netcheck report lists.
pub const FAILURES_MAX: usize = 32;
/// Largest control message, in bytes, whatever its kind (a full `Logs` batch fits).
pub const MESSAGE_MAX: usize = 2 * LOG_BATCH_BYTES;

/// Why a message was refused; logged by the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A list holds more entries than allowed.
    #[error("{what} holds {len} entries, over the limit of {max}")]
    TooMany {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// A text is longer than allowed.
    #[error("{what} is {len} bytes, over the limit of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// A metadata key or app slug that is not in the agent's manifest.
    #[error("{what} {name:?} is not in this agent's manifest")]
    NotInManifest { what: &'static str, name: String },
    /// The SSH host key is not exactly one `ssh-ed25519` public key.
    #[error("the SSH host key is not one ssh-ed25519 public key: {0}")]
    BadHostKey(String),
}

fn at_most(what: &'static str, len: usize, max: usize) -> Result<(), Refusal> {
    if len > max {
        Err(Refusal::TooMany { what, len, max })
    } else {
        Ok(())
    }
}

fn shorter(what: &'static str, text: &str, max: usize) -> Result<(), Refusal> {
    if text.len() > max {
        Err(Refusal::TooLong {
            what,
            len: text.len(),
            max,
        })
    } else {
        Ok(())
    }
}

fn log_lines(lines: &[LogLine]) -> Result<(), Refusal> {
    at_most("a log batch", lines.len(), LOG_BATCH_LINES)?;
    let mut total = 0;
    for l in lines {
        shorter("a log line", &l.text, LOG_LINE_MAX)?;
        total += l.text.len();
    }
    shorter_len("a log batch", total, LOG_BATCH_BYTES)
}

fn shorter_len(what: &'static str, len: usize, max: usize) -> Result<(), Refusal> {
    if len > max {
        Err(Refusal::TooLong { what, len, max })
    } else {
        Ok(())
    }
}

/// Parses an SSH host key as exactly one `ssh-ed25519` public key and returns it
/// in canonical form (`ssh-ed25519 BASE64`, no comment), which is all that reaches
/// the clients' known_hosts.
///
/// # Errors
/// [`Refusal::BadHostKey`] for anything else: another algorithm, a second line, a
/// certificate, options, garbage.
pub fn canonical_host_key(openssh: &str) -> Result<String, Refusal> {
    shorter("the SSH host key", openssh, 1024)?;
    if openssh.contains(['\n', '\r', '\0']) {
        return Err(Refusal::BadHostKey("it holds a line break".into()));
    }
    let mut parts = openssh.split(' ');
    let (Some(alg), Some(body)) = (parts.next(), parts.next()) else {
        return Err(Refusal::BadHostKey("want `ssh-ed25519 BASE64`".into()));
    };
    if alg != "ssh-ed25519" {
        return Err(Refusal::BadHostKey(format!("algorithm {alg:?}")));
    }
    let key = russh::keys::ssh_key::PublicKey::from_openssh(&format!("{alg} {body}"))
        .map_err(|e| Refusal::BadHostKey(e.to_string()))?;
    if key.algorithm() != russh::keys::ssh_key::Algorithm::Ed25519 {
        return Err(Refusal::BadHostKey("not an ed25519 key".into()));
    }
    let mut key = key;
    key.set_comment("");
    key.to_openssh()
        .map_err(|e| Refusal::BadHostKey(e.to_string()))
}

/// Checks one message from an agent whose manifest is `manifest`.
///
/// # Errors
/// The first [`Refusal`] that applies.
pub fn check_agent_message(msg: &AgentMessage, manifest: &Manifest) -> Result<(), Refusal> {
    match msg {
        AgentMessage::Addr { addr, proof } => {
            at_most("an address", addr.addrs.len(), ADDRS_MAX)?;
            shorter("an endpoint proof", proof, 128)
        }
        AgentMessage::Heartbeat => Ok(()),
        AgentMessage::HostKey { openssh } => canonical_host_key(openssh).map(|_| ()),
        AgentMessage::Lifecycle { .. } => Ok(()),
        AgentMessage::AppHealth { changes } => {
            at_most("an app health report", changes.len(), manifest.apps.len())?;
            for c in changes {
                if !manifest.apps.iter().any(|a| a.slug == c.slug) {
                    return Err(Refusal::NotInManifest {
                        what: "app",
                        name: c.slug.to_string(),
                    });
                }
            }
            Ok(())
        }
        AgentMessage::Stats { stats } => {
            at_most("relay latencies", stats.relay_latencies.len(), RELAYS_MAX)?;
            for r in &stats.relay_latencies {
                shorter("a relay URL", &r.relay_url, TEXT_MAX)?;
            }
            Ok(())
        }
        AgentMessage::Metadata { items } => {
            at_most("a metadata report", items.len(), manifest.metadata.len())?;
            for i in items {
                if !manifest.metadata.iter().any(|m| m.key == i.key) {
                    return Err(Refusal::NotInManifest {
                        what: "metadata key",
                        name: i.key.to_string(),
                    });
                }
                shorter("a metadata value", &i.value, METADATA_VALUE_MAX)?;
                if let Some(e) = &i.error {
                    shorter("a metadata error", e, METADATA_ERROR_MAX)?;
                }
            }
            Ok(())
        }
        AgentMessage::Logs { lines } => log_lines(lines),
        AgentMessage::Netcheck { result } => {
            shorter("a netcheck reason", &result.reason, 64)?;
            let r = &result.report;
            at_most("netcheck relays", r.relays.len(), RELAYS_MAX)?;
            at_most("netcheck failures", r.failures.len(), FAILURES_MAX)?;
            for relay in &r.relays {
                shorter("a relay URL", &relay.url, TEXT_MAX)?;
            }
            if let Some(p) = &r.preferred_relay {
                shorter("a relay URL", p, TEXT_MAX)?;
            }
            for f in &r.failures {
                shorter("a netcheck probe name", &f.probe, 64)?;
                shorter("a netcheck failure", &f.reason, TEXT_MAX)?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Name;
    use crate::api::{App, LogSource, MetadataSpec, MetadataValue};
    use crate::control::AppHealthChange;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn manifest() -> Manifest {
        Manifest {
            apps: vec![App {
                slug: name("web"),
                url: "http://localhost:1".into(),
                healthcheck: None,
            }],
            metadata: vec![MetadataSpec {
                key: name("cpu"),
                display_name: None,
                script: "true".into(),
                interval: 1,
                timeout: 1,
            }],
            ..Manifest::default()
        }
    }

    fn line(text: String) -> LogLine {
        LogLine {
            at: crate::Timestamp::from_unix_millis(1),
            source: LogSource::Startup,
            text,
        }
    }

    #[test]
    fn within_bounds_passes() {
        let m = manifest();
        let ok = [
            AgentMessage::Heartbeat,
            AgentMessage::Logs {
                lines: vec![line("x".repeat(LOG_LINE_MAX)); 10],
            },
            AgentMessage::Metadata {
                items: vec![MetadataValue {
                    key: name("cpu"),
                    value: "v".repeat(METADATA_VALUE_MAX),
                    error: None,
                    collected_at: crate::Timestamp::from_unix_millis(1),
                }],
            },
        ];
        for msg in ok {
            assert_eq!(check_agent_message(&msg, &m), Ok(()), "{msg:?}");
        }
    }

    #[test]
    fn every_bound_is_enforced() {
        let m = manifest();
        let too_much = [
            AgentMessage::Logs {
                lines: vec![line("x".repeat(LOG_LINE_MAX + 1))],
            },
            AgentMessage::Logs {
                lines: vec![line("x".into()); LOG_BATCH_LINES + 1],
            },
            AgentMessage::Logs {
                lines: vec![line("x".repeat(LOG_LINE_MAX)); LOG_BATCH_LINES],
            },
            AgentMessage::Metadata {
                items: vec![MetadataValue {
                    key: name("cpu"),
                    value: "v".repeat(METADATA_VALUE_MAX + 1),
                    error: None,
                    collected_at: crate::Timestamp::from_unix_millis(1),
                }],
            },
            AgentMessage::Metadata {
                items: vec![MetadataValue {
                    key: name("not-declared"),
                    value: "v".into(),
                    error: None,
                    collected_at: crate::Timestamp::from_unix_millis(1),
                }],
            },
            AgentMessage::AppHealth {
                changes: vec![AppHealthChange {
                    slug: name("ghost"),
                    health: crate::api::AppHealth::Healthy,
                }],
            },
            AgentMessage::HostKey {
                openssh: "ssh-rsa AAAA".into(),
            },
        ];
        for msg in too_much {
            assert!(check_agent_message(&msg, &m).is_err(), "{msg:?}");
        }
    }

    #[test]
    fn host_keys_are_one_ed25519_key_in_canonical_form() {
        let key = russh::keys::PrivateKey::from(
            russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[7; 32]),
        );
        let text = key.public_key().to_openssh().unwrap();
        assert_eq!(canonical_host_key(&text).unwrap(), text);
        assert_eq!(
            canonical_host_key(&format!("{text} comment")).unwrap(),
            text,
            "a comment is dropped"
        );
        for bad in [
            String::new(),
            "ssh-ed25519".into(),
            "ssh-ed25519 !!!".into(),
            format!("{text}\n{text}"),
            format!("@cert-authority * {text}"),
            format!("{text}\nevil.example ssh-ed25519 AAAA"),
            text.replace("ssh-ed25519", "ssh-dss"),
            "x".repeat(2000),
        ] {
            assert!(canonical_host_key(&bad).is_err(), "{bad}");
        }
    }
}
