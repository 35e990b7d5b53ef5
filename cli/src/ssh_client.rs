//! `myco ssh WS [-- CMD]`: an SSH client (russh) over a ticketed mesh stream, for
//! users who do not want to go through OpenSSH. The agent's host key is checked against
//! the coordinator's record, as `config-ssh` pins it for OpenSSH.
//!
//! A terminal gets raw mode, a PTY on the agent and resizes on SIGWINCH; without one,
//! stdin is streamed until EOF and SIGINT/SIGTERM/SIGHUP are passed to the command.
//! The remote exit status becomes ours (128 + N for a command killed by signal N).
//!
//! The keystroke path (figures in BENCHMARKS.md): the terminal, read on the client's
//! runtime thread (`stdio::Input`: the tty is opened again by name, so its non-blocking
//! mode lives on a file description of our own, never on the one shared with the user's
//! shell; a test checks the shell's stays blocking) -> the russh session task -> the
//! QUIC connection task -> UDP; on the agent the endpoint and connection tasks -> the
//! russh session, whose `data` handler writes the terminal directly -> the kernel's
//! echo -> the PTY reader task -> the session -> QUIC -> UDP; back here the session
//! loop writes the echo to the terminal itself (`TerminalOut`). Behind OpenSSH's
//! ProxyCommand (`myco ssh --stdio`) the pipes from and to the OpenSSH client are
//! opened again through `/proc/self/fd` and polled on the runtime's thread the same
//! way, and stdin is read straight into the buffer the QUIC stream sends. Hops removed
//! on the way: the stdin thread's wake-up, the agent's input-task turn, the client's
//! hand-over to its command task, the `block_on` self-wake, and ACK-only packets in the
//! middle of a round trip (peers are asked, through QUIC's ACK frequency extension, to
//! acknowledge after more than 4 packets or the 25 ms timer:
//! `mesh::endpoint::transport_config`). The agent's and server's default log filter
//! keeps `iroh::socket::transports` at warn, since iroh opens an info-level span per
//! datagram sent. What is left is per-packet work in user space (noq, iroh's socket,
//! russh, tokio) with no hot spot, which is why the release profile builds the whole
//! program as one unit (`lto = "fat"`, `codegen-units = 1`).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use russh::keys::{PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Sig};

use crate::dial::Dialed;
use crate::escape::{Action, Escapes, HELP};
use crate::stdio::{Output, Stream};

/// The SSH client's settings: the same bulk settings as the agent's server
/// (`mesh::ssh`), no SSH-level cipher inside the mesh, and no Nagle (keystrokes go out
/// at once).
pub fn config() -> Arc<russh::client::Config> {
    Arc::new(russh::client::Config {
        nodelay: true,
        window_size: mesh::ssh::WINDOW,
        maximum_packet_size: mesh::ssh::MAX_PACKET,
        channel_buffer_size: mesh::ssh::CHANNEL_BUFFER,
        preferred: mesh::ssh::client_preferred(),
        ..Default::default()
    })
}

/// `-R [BIND:]PORT:HOST:HOSTPORT`: the agent listens on BIND:PORT (loopback by
/// default, 0 picks a port) and each connection comes back to HOST:HOSTPORT here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteForward {
    pub bind: String,
    pub port: u16,
    pub host: String,
    pub host_port: u16,
}

impl std::str::FromStr for RemoteForward {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            format!(
                "bad remote forward {s:?}: {why}; use [BIND:]PORT:HOST:HOSTPORT, e.g. 8080:localhost:3000"
            )
        };
        let port = |p: &str, what: &str| {
            p.parse::<u16>()
                .map_err(|_| bad(&format!("{what} {p:?} is not a port number")))
        };
        let parts: Vec<&str> = s.split(':').collect();
        let (bind, rest) = match parts.as_slice() {
            [p, h, hp] => ("127.0.0.1", [*p, *h, *hp]),
            [b, p, h, hp] => (*b, [*p, *h, *hp]),
            _ => return Err(bad("expected 3 or 4 fields separated by ':'")),
        };
        let host_port = port(rest[2], "HOSTPORT")?;
        if host_port == 0 {
            return Err(bad("HOSTPORT 0 cannot be connected to"));
        }
        if rest[1].is_empty() {
            return Err(bad("HOST is empty"));
        }
        Ok(Self {
            bind: bind.to_owned(),
            port: port(rest[0], "PORT")?,
            host: rest[1].to_owned(),
            host_port,
        })
    }
}

/// What the user asked for.
pub struct Request {
    pub command: Option<String>,
    pub env: Vec<(String, String)>,
    pub forward_agent: bool,
    pub remote_forwards: Vec<RemoteForward>,
    /// Some(true) forces a terminal, Some(false) forbids one; None: one if stdin is.
    pub tty: Option<bool>,
}

/// The session channel's output when it goes to a terminal: written by the session
/// loop itself as it reads each packet, instead of being passed to the task that runs
/// the session and written on its next turn (about 20 µs of every keystroke's echo,
/// bench/ssh.sh). A terminal takes small writes at once.
#[derive(Default)]
struct TerminalOut {
    channel: std::sync::OnceLock<russh::ChannelId>,
    /// The first write that failed; the session reports it.
    failed: Mutex<Option<std::io::Error>>,
}

impl TerminalOut {
    /// Writes `data` if it is the terminal channel's (other channels' data, such as a
    /// forwarded port's, goes its own way).
    fn write(&self, channel: russh::ChannelId, stream: Stream, data: &[u8]) {
        if self.channel.get() != Some(&channel) {
            return;
        }
        if let Err(e) = crate::stdio::write_now(stream, data)
            && let Ok(mut failed) = self.failed.lock()
        {
            failed.get_or_insert(e);
        }
    }

    fn take_error(&self) -> Option<std::io::Error> {
        self.failed.lock().ok()?.take()
    }
}

/// The russh client's side of the connection.
struct Client {
    pinned: PublicKey,
    terminal: Arc<TerminalOut>,
    /// Remote forwards by the port the agent listens on.
    forwards: Arc<Mutex<HashMap<u32, (String, u16)>>>,
    agent_socket: Option<PathBuf>,
    /// Forwarded connections (remote forwards, agent forwarding): the connection's,
    /// stopped when it ends.
    tunnels: tokio::task::JoinSet<()>,
}

impl Client {
    /// Forgets the tunnels that have ended, so a long session does not keep them.
    fn reap(&mut self) {
        while self.tunnels.try_join_next().is_some() {}
    }
}

impl russh::client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(key.public_key().key_data() == self.pinned.key_data())
    }

    async fn data(
        &mut self,
        channel: russh::ChannelId,
        data: &[u8],
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        self.terminal.write(channel, Stream::Stdout, data);
        Ok(())
    }

    async fn extended_data(
        &mut self,
        channel: russh::ChannelId,
        _ext: u32,
        data: &[u8],
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        self.terminal.write(channel, Stream::Stderr, data);
        Ok(())
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<russh::client::Msg>,
        _connected_address: &str,
        connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        let target = self
            .forwards
            .lock()
            .ok()
            .and_then(|f| f.get(&connected_port).cloned());
        let Some((host, port)) = target else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        // Connected outside the session loop, so a slow target stalls nothing else.
        self.reap();
        self.tunnels.spawn(async move {
            match mesh::splice::connect(&host, port).await {
                Ok(mut tcp) => {
                    reply.accept().await;
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                }
                Err(e) => {
                    // \r: the terminal may be in raw mode.
                    eprint!("myco: remote forward cannot connect to {host}:{port}: {e}\r\n");
                    reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: russh::Channel<russh::client::Msg>,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        let Some(path) = self.agent_socket.clone() else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        match tokio::net::UnixStream::connect(&path).await {
            Ok(mut local) => {
                reply.accept().await;
                self.reap();
                self.tunnels.spawn(async move {
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut local).await;
                });
            }
            Err(e) => {
                tracing::warn!(
                    "cannot reach the local SSH agent at {}: {e}",
                    path.display()
                );
                reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }
}

/// The terminal in raw mode until dropped (then as it was).
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enable() -> anyhow::Result<Self> {
        use nix::sys::termios;
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin).context("cannot read the terminal's settings")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, termios::SetArg::TCSADRAIN, &raw)
            .context("cannot put the terminal in raw mode")?;
        Ok(Self(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSADRAIN,
            &self.0,
        );
    }
}

fn window_size() -> (u32, u32) {
    terminal_size::terminal_size_of(std::io::stdout())
        .or_else(|| terminal_size::terminal_size_of(std::io::stdin()))
        .map_or((80, 24), |(w, h)| (u32::from(w.0), u32::from(h.0)))
}

/// The exit code for a command killed by `sig` (as a shell reports it).
fn signal_exit_code(sig: &Sig) -> u8 {
    let n = match sig {
        Sig::HUP => 1,
        Sig::INT => 2,
        Sig::QUIT => 3,
        Sig::ILL => 4,
        Sig::ABRT => 6,
        Sig::FPE => 8,
        Sig::KILL => 9,
        Sig::USR1 => 10,
        Sig::SEGV => 11,
        Sig::PIPE => 13,
        Sig::ALRM => 14,
        Sig::TERM => 15,
        Sig::Custom(name) => format!("SIG{name}")
            .parse::<nix::sys::signal::Signal>()
            .map_or(127, |s| s as i32),
    };
    u8::try_from(128 + n).unwrap_or(255)
}

/// Runs the session; returns the remote command's exit code.
pub async fn run(d: Dialed, req: Request) -> anyhow::Result<u8> {
    let agent = d.info.agent.clone();
    let pinned = d.info.ssh_host_key.as_deref().with_context(|| {
        format!("agent {agent} has not reported its SSH host key yet; try again in a moment")
    })?;
    let pinned = PublicKey::from_openssh(pinned)
        .with_context(|| format!("the coordinator's host key for {agent} does not parse"))?;
    let agent_socket = if req.forward_agent {
        let sock = std::env::var_os("SSH_AUTH_SOCK")
            .filter(|s| !s.is_empty())
            .context("-A needs a local SSH agent, but SSH_AUTH_SOCK is not set; start ssh-agent or drop -A")?;
        Some(PathBuf::from(sock))
    } else {
        None
    };
    let forwards = Arc::new(Mutex::new(HashMap::new()));
    let terminal = Arc::new(TerminalOut::default());
    let client = Client {
        pinned,
        terminal: terminal.clone(),
        forwards: forwards.clone(),
        agent_socket,
        tunnels: tokio::task::JoinSet::new(),
    };
    let stream = tokio::io::join(d.recv, d.send);
    let mut session = russh::client::connect_stream(config(), stream, client)
        .await
        .map_err(|e| match e {
            russh::Error::UnknownKey => anyhow::anyhow!(
                "agent {agent} presented a host key that differs from the coordinator's record; refusing to connect"
            ),
            other => anyhow::anyhow!("SSH handshake with agent {agent} failed: {other}"),
        })?;
    let user = std::env::var("USER").unwrap_or_else(|_| "myco".into());
    let auth = session
        .authenticate_none(user)
        .await
        .context("SSH authentication failed")?;
    if !auth.success() {
        bail!("agent {agent} refused the SSH session");
    }

    for f in &req.remote_forwards {
        let port = session
            .tcpip_forward(f.bind.clone(), u32::from(f.port))
            .await
            .with_context(|| {
                format!(
                    "agent {agent} cannot listen on {}:{} for -R (in use, or not allowed)",
                    f.bind, f.port
                )
            })?;
        let port = if f.port == 0 { port } else { u32::from(f.port) };
        if f.port == 0 {
            eprintln!(
                "Allocated port {port} on {agent} for the remote forward to {}:{}",
                f.host, f.host_port
            );
        }
        if let Ok(mut m) = forwards.lock() {
            m.insert(port, (f.host.clone(), f.host_port));
        }
    }

    let broke = || format!("the SSH session with agent {agent} broke off; run `myco ssh` again");
    let mut channel = session
        .channel_open_session()
        .await
        .context("cannot open an SSH session channel")?;
    for (k, v) in &req.env {
        channel
            .set_env(false, k.as_str(), v.as_str())
            .await
            .with_context(broke)?;
    }
    if req.forward_agent {
        channel.agent_forward(false).await.with_context(broke)?;
    }
    let stdin_tty = std::io::stdin().is_terminal();
    let tty = req
        .tty
        .unwrap_or(stdin_tty && (req.command.is_none() || std::io::stdout().is_terminal()));
    if tty {
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into());
        let (cols, rows) = window_size();
        channel
            .request_pty(false, &term, cols, rows, 0, 0, &[])
            .await
            .with_context(broke)?;
    }
    match &req.command {
        Some(c) => channel.exec(true, c.as_str()).await.with_context(broke)?,
        None => channel.request_shell(true).await.with_context(broke)?,
    }
    let _raw = if tty && stdin_tty {
        Some(RawMode::enable()?)
    } else {
        None
    };

    use tokio::signal::unix::{SignalKind, signal};
    let mut winch = signal(SignalKind::window_change())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut input = crate::stdio::Input::stdin();
    let mut input_open = true;
    // A terminal's output is written by the session loop as it arrives (see
    // `TerminalOut`); a pipe or file may block, and gets a thread of its own.
    let to_terminal = tty && std::io::stdout().is_terminal();
    if to_terminal {
        let _ = terminal.channel.set(channel.id());
    }
    let mut output = Output::threaded();
    // OpenSSH's `~.` and friends, on a terminal in raw mode (as OpenSSH with a tty).
    let mut escapes = _raw.as_ref().map(|_| Escapes::default());
    // SIGINT/SIGTERM/SIGHUP go to the remote command; a second one ends `myco ssh`
    // here, for a command that ignores them or a link that hangs.
    let mut signals = 0;
    let mut code = None;
    loop {
        tokio::select! {
            chunk = input.recv(), if input_open => match chunk {
                Some(data) => {
                    let (data, action) = match escapes.as_mut() {
                        Some(e) => e.feed(data),
                        None => (data, None),
                    };
                    if !data.is_empty() {
                        channel.data_bytes(data).await.with_context(broke)?;
                    }
                    match action {
                        Some(Action::Disconnect) => {
                            drop(_raw);
                            eprintln!("Connection to {agent} closed.");
                            return Ok(255);
                        }
                        Some(Action::Help) => {
                            let _ = crate::stdio::write_now(Stream::Stderr, HELP.as_bytes());
                        }
                        None => {}
                    }
                }
                None => {
                    input_open = false;
                    // On a terminal, EOF is ^D typed into the remote shell instead.
                    if !tty {
                        channel.eof().await.with_context(broke)?;
                    }
                }
            },
            _ = winch.recv() => {
                let (cols, rows) = window_size();
                channel.window_change(cols, rows, 0, 0).await.with_context(broke)?;
            }
            sig = async {
                tokio::select! {
                    _ = int.recv() => Sig::INT,
                    _ = term.recv() => Sig::TERM,
                    _ = hup.recv() => Sig::HUP,
                }
            } => {
                signals += 1;
                if signals > 1 {
                    return Ok(signal_exit_code(&sig));
                }
                channel.signal(sig).await.with_context(broke)?;
            }
            msg = channel.wait() => match msg {
                Some(ChannelMsg::Data { .. } | ChannelMsg::ExtendedData { .. }) if to_terminal => {
                    if let Some(e) = terminal.take_error() {
                        return Err(e).context("cannot write to the terminal");
                    }
                }
                Some(ChannelMsg::Data { data }) => output.write(Stream::Stdout, data).await?,
                Some(ChannelMsg::ExtendedData { data, .. }) => {
                    output.write(Stream::Stderr, data).await?;
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    code = Some(u8::try_from(exit_status).unwrap_or(255));
                }
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                    code = Some(signal_exit_code(&signal_name));
                }
                Some(ChannelMsg::Failure) => {
                    bail!("agent {agent} could not start the {}", if req.command.is_some() { "command" } else { "shell" });
                }
                Some(_) => {}
                None => break,
            },
        }
    }
    output.finish().await?;
    drop(_raw);
    // Without an exit status the agent may have said why it ended the connection.
    let why = match code {
        Some(_) => None,
        None => crate::dial::agent_reason(&d.conn).await,
    };
    let _ = session
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
    d.conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), d.mesh.endpoint.close()).await;
    match code {
        Some(c) => Ok(c),
        None => match why {
            Some(why) => {
                bail!("the connection to agent {agent} ended without an exit status: {why}")
            }
            None => bail!("the connection to agent {agent} ended without an exit status"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_forward_specs() {
        let f: RemoteForward = "8080:localhost:3000".parse().unwrap();
        assert_eq!(
            f,
            RemoteForward {
                bind: "127.0.0.1".into(),
                port: 8080,
                host: "localhost".into(),
                host_port: 3000
            }
        );
        let f: RemoteForward = "0.0.0.0:0:127.0.0.1:22".parse().unwrap();
        assert_eq!((f.bind.as_str(), f.port), ("0.0.0.0", 0));
        for bad in ["8080", "a:b:c", "1:h:0", "70000:h:1", "1::2", "1:2:3:4:5"] {
            let e = bad.parse::<RemoteForward>().unwrap_err();
            assert!(e.contains(bad) && e.contains("[BIND:]PORT"), "{e}");
        }
    }

    #[test]
    fn signals_become_shell_exit_codes() {
        assert_eq!(signal_exit_code(&Sig::INT), 130);
        assert_eq!(signal_exit_code(&Sig::TERM), 143);
        assert_eq!(signal_exit_code(&Sig::Custom("USR2".into())), 140);
    }
}
