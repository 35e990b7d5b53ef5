//! Port specs of `myco port-forward`, in Coder's syntax: `PORT`, `LOCAL:REMOTE`,
//! `ADDR:LOCAL:REMOTE` (`[ADDR]` for IPv6; `ADDR:PORT` too), ranges `A-B` (each port
//! to itself) and `A-B:C-D` (range to range of equal length), and comma-separated
//! lists of these. Parsing is a pure function of the text.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::control::ForwardProtocol;

/// Where local listeners bind when the spec names no address: this machine only.
pub const DEFAULT_BIND: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Most forwards one command may ask for: every port, over TCP and over UDP. Each is
/// a listening socket, so more is a mistake; refusing it keeps a few kilobytes of
/// ranges from allocating gigabytes (TESTING.md, "Fuzzing").
pub const MAX_FORWARDS: usize = 2 * u16::MAX as usize;

/// One local port and the workspace port its traffic goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortForward {
    pub protocol: ForwardProtocol,
    pub local: SocketAddr,
    pub remote_port: u16,
}

/// Why one spec is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Nothing between commas, or nothing at all.
    #[error("a port is missing; write e.g. 8080, 5678:1234 or 127.0.0.1:8080:8080")]
    Empty,
    /// Not a number, not a range.
    #[error(
        "{0:?} is not a port; write PORT, LOCAL:REMOTE, ADDR:LOCAL:REMOTE or a range like 9090-9092"
    )]
    NotAPort(String),
    /// Port 0 means "any port" to the OS, which cannot be forwarded.
    #[error("port 0 cannot be forwarded; ports run from 1 to 65535")]
    Zero,
    /// A number over 65535.
    #[error("port {0} is out of range; ports run from 1 to 65535")]
    OutOfRange(String),
    /// `9092-9090`.
    #[error("{0:?} is not a range; write the lower port first, like 9090-9092")]
    BackwardRange(String),
    /// `9090-9092:9190` or `9090-9092:9190-9199`.
    #[error(
        "{local:?} has {local_len} ports but {remote:?} has {remote_len}; map ranges of equal length"
    )]
    LengthMismatch {
        local: String,
        local_len: u32,
        remote: String,
        remote_len: u32,
    },
    /// The part before the ports is not an IP address.
    #[error(
        "{0:?} is not an IP address to listen on; write e.g. 127.0.0.1, 0.0.0.0 or [::1] (IPv6 in brackets)"
    )]
    BadAddress(String),
    /// More colons than `ADDR:LOCAL:REMOTE` has.
    #[error("too many colons; write ADDR:LOCAL:REMOTE, with an IPv6 address in brackets")]
    Shape,
    /// The same local address and port twice for one protocol.
    #[error("local {0} is forwarded twice; give each local port once")]
    Duplicate(SocketAddr),
    /// More than [`MAX_FORWARDS`] forwards in all.
    #[error("more than {MAX_FORWARDS} forwards asked for; forward fewer ports")]
    TooMany,
}

/// A bad spec, with the flag and the text it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad --{protocol} spec {spec:?}: {error}")]
pub struct BadSpec {
    pub protocol: ForwardProtocol,
    pub spec: String,
    pub error: SpecError,
}

/// Every forward the `--tcp` and `--udp` values ask for, in order.
///
/// # Errors
/// [`BadSpec`] naming the first value that is not valid, that repeats a local
/// address and port of the same protocol, or that takes the total over
/// [`MAX_FORWARDS`].
pub fn parse_all(tcp: &[String], udp: &[String]) -> Result<Vec<PortForward>, BadSpec> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let flags = tcp
        .iter()
        .map(|s| (ForwardProtocol::Tcp, s))
        .chain(udp.iter().map(|s| (ForwardProtocol::Udp, s)));
    for (protocol, spec) in flags {
        let bad = |error| BadSpec {
            protocol,
            spec: spec.clone(),
            error,
        };
        let forwards = parse(protocol, spec).map_err(bad)?;
        if out.len() + forwards.len() > MAX_FORWARDS {
            return Err(bad(SpecError::TooMany));
        }
        for fwd in forwards {
            if !seen.insert((fwd.protocol, fwd.local)) {
                return Err(bad(SpecError::Duplicate(fwd.local)));
            }
            out.push(fwd);
        }
    }
    Ok(out)
}

/// The forwards one `--tcp` or `--udp` value asks for.
///
/// # Errors
/// [`SpecError`] for the first item of the list that is not valid, or that takes
/// the list over [`MAX_FORWARDS`].
pub fn parse(protocol: ForwardProtocol, spec: &str) -> Result<Vec<PortForward>, SpecError> {
    let mut out = Vec::new();
    for item in spec.split(',') {
        // One item is at most a range of every port, so the check after it bounds
        // what is held.
        let forwards = parse_item(protocol, item.trim())?;
        if out.len() + forwards.len() > MAX_FORWARDS {
            return Err(SpecError::TooMany);
        }
        out.extend(forwards);
    }
    Ok(out)
}

/// `PORT`, `LOCAL:REMOTE`, `ADDR:PORT` or `ADDR:LOCAL:REMOTE`, each port maybe a range.
fn parse_item(protocol: ForwardProtocol, item: &str) -> Result<Vec<PortForward>, SpecError> {
    if item.is_empty() {
        return Err(SpecError::Empty);
    }
    let (addr, ports) = split_address(item)?;
    let addr = addr.unwrap_or(DEFAULT_BIND);
    let (local_text, remote_text) = ports.split_once(':').unwrap_or((ports, ports));
    let local = parse_span(local_text)?;
    let remote = parse_span(remote_text)?;
    if local.len() != remote.len() {
        return Err(SpecError::LengthMismatch {
            local: local_text.to_owned(),
            local_len: local.len(),
            remote: remote_text.to_owned(),
            remote_len: remote.len(),
        });
    }
    Ok((local.first..=local.last)
        .zip(remote.first..=remote.last)
        .map(|(l, r)| PortForward {
            protocol,
            local: SocketAddr::new(addr, l),
            remote_port: r,
        })
        .collect())
}

/// Splits off the listen address, if the item has one, from the ports.
fn split_address(item: &str) -> Result<(Option<IpAddr>, &str), SpecError> {
    if let Some(rest) = item.strip_prefix('[') {
        let Some((ip, ports)) = rest.split_once(']') else {
            return Err(SpecError::BadAddress(item.to_owned()));
        };
        let ip = ip
            .parse::<IpAddr>()
            .map_err(|_| SpecError::BadAddress(format!("[{ip}]")))?;
        let ports = ports.strip_prefix(':').ok_or(SpecError::Empty)?;
        return Ok((Some(ip), ports));
    }
    match item.matches(':').count() {
        0 => Ok((None, item)),
        1 => {
            let (first, rest) = item.split_once(':').unwrap_or((item, ""));
            if looks_like_ports(first) {
                Ok((None, item))
            } else {
                // `127.0.0.1:8080`: an address and one port (or range) for both sides.
                match first.parse::<IpAddr>() {
                    Ok(ip) => Ok((Some(ip), rest)),
                    Err(_) => Err(SpecError::NotAPort(first.to_owned())),
                }
            }
        }
        2 => {
            let (ip, ports) = item.split_once(':').unwrap_or((item, ""));
            let ip = ip
                .parse::<IpAddr>()
                .map_err(|_| SpecError::BadAddress(ip.to_owned()))?;
            Ok((Some(ip), ports))
        }
        _ => Err(SpecError::Shape),
    }
}

fn looks_like_ports(s: &str) -> bool {
    s.chars().all(|c| c.is_ascii_digit() || c == '-')
}

/// An inclusive run of ports; one port is a run of one.
#[derive(Debug, Clone, Copy)]
struct Span {
    first: u16,
    last: u16,
}

impl Span {
    fn len(self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }
}

fn parse_span(text: &str) -> Result<Span, SpecError> {
    match text.split_once('-') {
        None => {
            let p = parse_port(text)?;
            Ok(Span { first: p, last: p })
        }
        Some((a, b)) => {
            if a.is_empty() || b.is_empty() || b.contains('-') {
                return Err(SpecError::NotAPort(text.to_owned()));
            }
            let span = Span {
                first: parse_port(a)?,
                last: parse_port(b)?,
            };
            if span.first > span.last {
                return Err(SpecError::BackwardRange(text.to_owned()));
            }
            Ok(span)
        }
    }
}

fn parse_port(text: &str) -> Result<u16, SpecError> {
    if text.is_empty() {
        return Err(SpecError::Empty);
    }
    if !text.chars().all(|c| c.is_ascii_digit()) {
        return Err(SpecError::NotAPort(text.to_owned()));
    }
    match text.parse::<u64>() {
        Ok(0) => Err(SpecError::Zero),
        Ok(n) => u16::try_from(n).map_err(|_| SpecError::OutOfRange(text.to_owned())),
        // More digits than a u64 holds.
        Err(_) => Err(SpecError::OutOfRange(text.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use ForwardProtocol::{Tcp, Udp};

    fn fwd(protocol: ForwardProtocol, local: &str, remote_port: u16) -> PortForward {
        PortForward {
            protocol,
            local: local.parse().unwrap(),
            remote_port,
        }
    }

    fn tcp(spec: &str) -> Result<Vec<PortForward>, SpecError> {
        parse(Tcp, spec)
    }

    #[test]
    fn coders_forms() {
        assert_eq!(tcp("5678:1234"), Ok(vec![fwd(Tcp, "127.0.0.1:5678", 1234)]));
        assert_eq!(tcp("9000"), Ok(vec![fwd(Tcp, "127.0.0.1:9000", 9000)]));
        assert_eq!(
            tcp("127.0.0.1:8080:8080"),
            Ok(vec![fwd(Tcp, "127.0.0.1:8080", 8080)])
        );
        assert_eq!(
            tcp("0.0.0.0:80:3000"),
            Ok(vec![fwd(Tcp, "0.0.0.0:80", 3000)])
        );
        assert_eq!(
            tcp("8080,9000:3000,9090-9092"),
            Ok(vec![
                fwd(Tcp, "127.0.0.1:8080", 8080),
                fwd(Tcp, "127.0.0.1:9000", 3000),
                fwd(Tcp, "127.0.0.1:9090", 9090),
                fwd(Tcp, "127.0.0.1:9091", 9091),
                fwd(Tcp, "127.0.0.1:9092", 9092),
            ])
        );
        assert_eq!(
            parse(Udp, "9090-9092:9190-9192"),
            Ok(vec![
                fwd(Udp, "127.0.0.1:9090", 9190),
                fwd(Udp, "127.0.0.1:9091", 9191),
                fwd(Udp, "127.0.0.1:9092", 9192),
            ])
        );
        assert_eq!(tcp("65535"), Ok(vec![fwd(Tcp, "127.0.0.1:65535", 65535)]));
        assert_eq!(tcp("7-7"), Ok(vec![fwd(Tcp, "127.0.0.1:7", 7)]));
    }

    #[test]
    fn addresses() {
        assert_eq!(
            tcp("[::1]:8080:3000"),
            Ok(vec![fwd(Tcp, "[::1]:8080", 3000)])
        );
        assert_eq!(tcp("[::]:8080"), Ok(vec![fwd(Tcp, "[::]:8080", 8080)]));
        assert_eq!(
            tcp("192.168.1.5:8080"),
            Ok(vec![fwd(Tcp, "192.168.1.5:8080", 8080)])
        );
        assert_eq!(
            tcp("10.0.0.1:9000-9001"),
            Ok(vec![
                fwd(Tcp, "10.0.0.1:9000", 9000),
                fwd(Tcp, "10.0.0.1:9001", 9001)
            ])
        );
        assert_eq!(
            tcp(" 8080 , 127.0.0.1:9000:90 "),
            Ok(vec![
                fwd(Tcp, "127.0.0.1:8080", 8080),
                fwd(Tcp, "127.0.0.1:9000", 90)
            ])
        );
    }

    #[test]
    fn bad_ports() {
        assert_eq!(tcp("0"), Err(SpecError::Zero));
        assert_eq!(tcp("8080:0"), Err(SpecError::Zero));
        assert_eq!(tcp("65536"), Err(SpecError::OutOfRange("65536".into())));
        assert_eq!(
            tcp("99999999999999999999999"),
            Err(SpecError::OutOfRange("99999999999999999999999".into()))
        );
        assert_eq!(tcp("http"), Err(SpecError::NotAPort("http".into())));
        assert_eq!(tcp("+80"), Err(SpecError::NotAPort("+80".into())));
        assert_eq!(tcp("80:x"), Err(SpecError::NotAPort("x".into())));
        assert_eq!(tcp("80a:90"), Err(SpecError::NotAPort("80a".into())));
    }

    #[test]
    fn bad_ranges() {
        assert_eq!(
            tcp("9092-9090"),
            Err(SpecError::BackwardRange("9092-9090".into()))
        );
        assert_eq!(tcp("9090-"), Err(SpecError::NotAPort("9090-".into())));
        assert_eq!(tcp("-9090"), Err(SpecError::NotAPort("-9090".into())));
        assert_eq!(tcp("1-2-3"), Err(SpecError::NotAPort("1-2-3".into())));
        assert_eq!(tcp("0-5"), Err(SpecError::Zero));
        assert_eq!(
            tcp("9090-9092:9190"),
            Err(SpecError::LengthMismatch {
                local: "9090-9092".into(),
                local_len: 3,
                remote: "9190".into(),
                remote_len: 1,
            })
        );
        assert!(matches!(
            tcp("9090-9092:9190-9199"),
            Err(SpecError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn empty_and_garbage() {
        assert_eq!(tcp(""), Err(SpecError::Empty));
        assert_eq!(tcp("  "), Err(SpecError::Empty));
        assert_eq!(tcp("8080,"), Err(SpecError::Empty));
        assert_eq!(tcp("8080,,9000"), Err(SpecError::Empty));
        assert_eq!(tcp("8080:"), Err(SpecError::Empty));
        assert_eq!(tcp(":8080"), Err(SpecError::Empty));
        assert_eq!(tcp("[::1]"), Err(SpecError::Empty));
        assert_eq!(tcp("1:2:3:4"), Err(SpecError::Shape));
        assert_eq!(tcp("::1:80:80"), Err(SpecError::Shape));
        assert_eq!(
            tcp("localhost:80:80"),
            Err(SpecError::BadAddress("localhost".into()))
        );
        assert_eq!(
            tcp("localhost:80"),
            Err(SpecError::NotAPort("localhost".into()))
        );
        assert_eq!(
            tcp("[::1:80:80"),
            Err(SpecError::BadAddress("[::1:80:80".into()))
        );
        assert_eq!(tcp("[foo]:80"), Err(SpecError::BadAddress("[foo]".into())));
    }

    #[test]
    fn duplicates_across_values_of_one_protocol() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let err = parse_all(&s(&["8080", "9000,8080:3000"]), &[]).unwrap_err();
        assert_eq!(
            err,
            BadSpec {
                protocol: Tcp,
                spec: "9000,8080:3000".into(),
                error: SpecError::Duplicate("127.0.0.1:8080".parse().unwrap()),
            }
        );
        assert_eq!(
            err.to_string(),
            "bad --tcp spec \"9000,8080:3000\": local 127.0.0.1:8080 is forwarded twice; \
             give each local port once"
        );
        assert!(parse_all(&s(&["8080-8082,8081"]), &[]).is_err());
        // The same port over TCP and UDP, or on two addresses, is two forwards.
        assert_eq!(parse_all(&s(&["53"]), &s(&["53"])).unwrap().len(), 2);
        assert_eq!(
            parse_all(&s(&["8080", "0.0.0.0:8080"]), &[]).unwrap().len(),
            2
        );
    }

    #[test]
    fn at_most_every_port_over_both_protocols() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(tcp("1-65535,1-65535").unwrap().len(), MAX_FORWARDS);
        assert_eq!(tcp("1-65535,1-65535,1"), Err(SpecError::TooMany));
        // 8 KB of ranges once held 65 million forwards, over 2 GB (TESTING.md).
        assert_eq!(
            tcp(&vec!["1-65535"; 1000].join(",")),
            Err(SpecError::TooMany)
        );
        let all = parse_all(&s(&["1-65535"]), &s(&["1-65535"])).unwrap();
        assert_eq!(all.len(), MAX_FORWARDS);
        let err = parse_all(&s(&["1-65535", "127.0.0.2:1"]), &s(&["1-65535"])).unwrap_err();
        assert_eq!(err.error, SpecError::TooMany);
        assert_eq!(err.spec, "1-65535");
    }

    #[test]
    fn errors_name_the_flag_and_spec() {
        let err = parse_all(&[], &["70000".to_string()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad --udp spec \"70000\": port 70000 is out of range; ports run from 1 to 65535"
        );
    }
}
