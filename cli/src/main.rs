//! The `myco` binary: parses arguments, runs one command, and turns any failure into
//! one readable line on stderr and a non-zero exit code.

mod client;
mod cmd;
mod dial;
mod dirs;
mod escape;
mod output;
mod session;
mod ssh_client;
mod stdio;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// Self-hosted remote development environments built around the workspace agent.
#[derive(Debug, Parser)]
#[command(
    name = "myco",
    version,
    about = "Myco: self-hosted remote development environments built around the workspace agent",
    long_about = None
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "MYCO_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,

    /// The client flags also work before the command (`myco --url U whoami`), as they
    /// always have; hidden there, since they mean nothing to `server`, `completion`
    /// and `man` (see [`cli_command`]).
    #[command(flatten)]
    client: ClientArgs,

    #[command(subcommand)]
    command: Command,
}

/// How a command reaches the coordinator: the flags of every command that talks to
/// it, and only of those (`myco server --help` does not list them).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Coordinator options")]
pub struct ClientArgs {
    /// URL of the coordinator; defaults to the one you logged in to.
    #[arg(long, global = true, env = "MYCO_URL")]
    url: Option<String>,

    /// API token to use instead of the saved session.
    #[arg(long, global = true, env = "MYCO_TOKEN", hide_env_values = true)]
    token: Option<String>,

    #[command(flatten)]
    session: SessionArgs,
}

impl ClientArgs {
    /// These flags given after the command, else those given before it.
    fn or(self, top: ClientArgs) -> ClientArgs {
        ClientArgs {
            url: self.url.or(top.url),
            token: self.token.or(top.token),
            session: SessionArgs {
                config_dir: self.session.config_dir.or(top.session.config_dir),
                tls: self.session.tls.or(top.session.tls),
            },
        }
    }
}

/// Where the saved session lives and whom https:// trusts: [`ClientArgs`] less the
/// URL and token, which `myco login` takes its own way.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Coordinator options")]
pub struct SessionArgs {
    /// Where the session file lives (default: $XDG_CONFIG_HOME/myco, i.e. ~/.config/myco).
    #[arg(long, global = true, env = "MYCO_CONFIG_DIR")]
    config_dir: Option<PathBuf>,

    #[command(flatten)]
    tls: TlsArgs,
}

/// Whom https:// and wss:// trust, and whether credentials may cross plain http://.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// A PEM file of CA certificates to trust for https:// and wss:// besides the
    /// system's (which SSL_CERT_FILE and SSL_CERT_DIR replace, as for curl).
    #[arg(long, global = true, env = "MYCO_CA_CERT_FILE")]
    ca_cert_file: Option<PathBuf>,

    /// Send passwords and tokens over plain http:// to a host that is not loopback
    /// (they cross the network readable by anyone on the path); warns when it does.
    #[arg(long, global = true, env = "MYCO_INSECURE_HTTP")]
    insecure_http: bool,
}

impl TlsArgs {
    fn or(self, top: TlsArgs) -> TlsArgs {
        TlsArgs {
            ca_cert_file: self.ca_cert_file.or(top.ca_cert_file),
            insecure_http: self.insecure_http || top.insecure_http,
        }
    }

    /// These settings as flags for a `myco` that OpenSSH starts later (config-ssh's
    /// ProxyCommand), which gets neither this shell's environment nor its directory.
    pub fn flags(&self) -> anyhow::Result<Vec<String>> {
        use anyhow::Context as _;
        let mut flags = Vec::new();
        if let Some(ca) = &self.ca_cert_file {
            let ca = std::path::absolute(ca)
                .with_context(|| format!("cannot resolve {}", ca.display()))?;
            flags.push(format!("--ca-cert-file \"{}\"", ca.display()));
        }
        if self.insecure_http {
            flags.push("--insecure-http".to_owned());
        }
        Ok(flags)
    }

    /// Before any client is built: every TLS client of the process shares it.
    fn apply(&self) -> anyhow::Result<()> {
        trust::init(self.ca_cert_file.as_deref())?;
        client::allow_insecure_http(self.insecure_http);
        Ok(())
    }
}

/// A command that talks to the coordinator: its own arguments and [`ClientArgs`].
#[derive(Debug, clap::Args)]
struct Client<A: clap::Args> {
    #[command(flatten)]
    args: A,
    #[command(flatten)]
    client: ClientArgs,
}

/// `myco login`, which names the coordinator by argument and makes the session.
#[derive(Debug, clap::Args)]
struct Session<A: clap::Args> {
    #[command(flatten)]
    args: A,
    #[command(flatten)]
    session: SessionArgs,
}

/// A group of commands that talk to the coordinator (`myco users ...`).
#[derive(Debug, clap::Args)]
struct ClientGroup<S: clap::Subcommand> {
    #[command(subcommand)]
    command: S,
    #[command(flatten)]
    client: ClientArgs,
}

/// The ids of the client flags, hidden and not global before the command.
const CLIENT_FLAGS: [&str; 5] = [
    "url",
    "token",
    "config_dir",
    "ca_cert_file",
    "insecure_http",
];

/// The command tree as `myco` parses it, completes it and documents it.
fn cli_command() -> clap::Command {
    CLIENT_FLAGS.iter().fold(Cli::command(), |cmd, id| {
        cmd.mut_arg(*id, |a| a.global(false).hide(true))
    })
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once per process; boxing the server's many flags would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator: HTTP API, store and relay.
    #[cfg(feature = "server")]
    Server(cmd::server::Args),
    /// Run the workspace agent (inside the workspace): control channel and mesh services.
    ///
    /// SIGTERM or SIGINT stops it after its shutdown script; a second one cuts the
    /// script short.
    Agent(cmd::agent::Args),
    /// Ping an agent over the mesh, showing whether each pong went direct or via the relay.
    Ping(Client<cmd::ping::Args>),
    /// Check this machine's network: UDP, public address, NAT kind, port mapping, relay
    /// latency; says what stands in the way of direct connections.
    Netcheck(Client<cmd::netcheck::Args>),
    /// Measure throughput to or from an agent over the mesh.
    Speedtest(Client<cmd::speedtest::Args>),
    /// Forward local TCP and UDP ports to ports in a workspace over the mesh.
    PortForward(Client<cmd::port_forward::Args>),
    /// Open a shell or run a command on an agent over SSH (`--stdio`: the raw SSH stream,
    /// for OpenSSH's ProxyCommand).
    Ssh(Client<cmd::ssh::SshArgs>),
    /// Write a `Host myco.*` block into your SSH config and pin the agents' host keys.
    ConfigSsh(Client<cmd::ssh::ConfigSshArgs>),
    /// Log in to a coordinator and save the session (creates the first user with --first-user).
    Login(Session<cmd::login::LoginArgs>),
    /// Revoke the saved session and delete it.
    Logout(ClientArgs),
    /// Show who you are logged in as, and where.
    Whoami(Client<output::OutputArgs>),
    /// Manage users: admins create, disable, enable and delete them; anyone changes
    /// their own password or revokes their own sessions and tokens.
    Users(ClientGroup<cmd::users::UsersCommand>),
    /// Manage your named API tokens.
    Tokens(ClientGroup<cmd::tokens::TokensCommand>),
    /// Create a workspace and print each agent's token and start command.
    Create(Client<cmd::workspaces::CreateArgs>),
    /// List workspaces.
    #[command(visible_alias = "list")]
    Ls(Client<cmd::workspaces::ListArgs>),
    /// Show one workspace with its agents: status, lifecycle, apps' health, metadata.
    Show(Client<cmd::workspaces::ShowArgs>),
    /// Print an agent's startup and shutdown script output.
    Logs(Client<cmd::workspaces::LogsArgs>),
    /// Delete a workspace and revoke its agents' tokens (a template's: after its
    /// delete build has removed its machine).
    Delete(Client<cmd::workspaces::DeleteArgs>),
    /// Start a template's stopped workspace: a start build, its output on stderr.
    Start(Client<cmd::lifecycle::TransitionArgs>),
    /// Stop a template's workspace: a stop build, its output on stderr.
    Stop(Client<cmd::lifecycle::TransitionArgs>),
    /// Stop, then start, a template's workspace.
    Restart(Client<cmd::lifecycle::TransitionArgs>),
    /// Cancel a workspace's build (the latest by default).
    Cancel(Client<cmd::lifecycle::CancelArgs>),
    /// List a workspace's builds (start, stop, delete), newest first.
    Builds(Client<cmd::lifecycle::BuildsArgs>),
    /// When a template's workspace stops and starts by itself: show, stop, extend, start.
    Schedule(ClientGroup<cmd::lifecycle::ScheduleCommand>),
    /// Run workspace builds for a coordinator, away from it (where the cloud
    /// credentials live), with a key from `myco provisioner-keys create`.
    #[cfg(feature = "server")]
    Provisioner(cmd::provisioner::Args),
    /// Manage external provisioners' keys (admins).
    #[cfg(feature = "server")]
    ProvisionerKeys(ClientGroup<cmd::provisioner::KeysCommand>),
    /// Manage templates: push (admins), ls, show, delete (admins).
    Templates(ClientGroup<cmd::lifecycle::TemplatesCommand>),
    /// Replace an agent's token (the old one stops working) and print the new one.
    RotateAgentToken(Client<cmd::workspaces::RotateArgs>),
    /// Load-test a coordinator with simulated agents and check what /metrics says.
    #[cfg(feature = "server")]
    Scaletest(ClientGroup<cmd::scaletest::ScaletestCommand>),
    /// Print shell completions: `myco completion bash > /etc/bash_completion.d/myco`.
    Completion { shell: clap_complete::Shell },
    /// Write man pages (myco.1, myco-server.1, ...) into a directory.
    #[command(hide = true)]
    Man {
        /// Where to write them.
        dir: PathBuf,
    },
}

/// `myco completion SHELL`: completions for the whole command tree, on stdout.
fn completion(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cli_command(), "myco", &mut out);
    // Written here, not by the generator, so a closed pipe ends quietly.
    std::io::stdout().write_all(&out)?;
    Ok(())
}

/// `myco man DIR`: one page per command, as clap_mangen renders them.
fn man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = cli_command();
    cmd.build();
    fn write(cmd: &clap::Command, name: &str, dir: &std::path::Path) -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        // clap names commands with static strings; a one-shot command may leak a few.
        let static_name: &'static str = Box::leak(name.to_owned().into_boxed_str());
        clap_mangen::Man::new(cmd.clone().name(static_name))
            .render(&mut out)
            .with_context(|| format!("cannot render {name}.1"))?;
        std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            write(sub, &format!("{name}-{}", sub.get_name()), dir)?;
        }
        Ok(())
    }
    write(&cmd, "myco", dir)?;
    println!("wrote man pages to {}", dir.display());
    Ok(())
}

/// The coordinator and the scaletest: many peers, a multi-threaded runtime.
#[cfg(feature = "server")]
fn is_server(command: &Command) -> bool {
    matches!(command, Command::Server(_) | Command::Scaletest(_))
}

#[cfg(feature = "server")]
fn is_coordinator(command: &Command) -> bool {
    matches!(command, Command::Server(_))
}

/// The agent-only build has no coordinator and no scaletest.
#[cfg(not(feature = "server"))]
fn is_server(_: &Command) -> bool {
    false
}

#[cfg(not(feature = "server"))]
fn is_coordinator(_: &Command) -> bool {
    false
}

/// Ends `myco` with this exit code and no message (e.g. `myco ssh`'s remote command's).
#[derive(Debug)]
pub struct ExitWith(pub u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

/// Global options every command may need.
#[derive(Debug, Clone)]
pub struct Globals {
    pub url: Option<String>,
    pub token: Option<String>,
    /// `--token` was given on the command line (not by `MYCO_TOKEN`), where every
    /// local user can read it in the process list.
    pub token_in_argv: bool,
    pub config_dir: Option<PathBuf>,
    pub tls: TlsArgs,
}

fn main() -> ExitCode {
    let matches = match cli_command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return usage_error(e),
    };
    if let Some(line) = misplaced_client_flag(&matches) {
        eprintln!("myco: {line}");
        return ExitCode::from(2);
    }
    let token_in_argv = token_on_command_line(&matches);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e.format(&mut cli_command())),
    };
    let server = is_coordinator(&cli.command) || matches!(cli.command, Command::Agent(_));
    init_tracing(cli.log_format, server);
    // Only the coordinator, which serves thousands of agents, and the scaletest, which
    // simulates them (its scrapes must not be timed behind their heartbeats), get a
    // worker per core. Everything else runs on one thread, so a mesh round trip
    // crosses no worker threads: a `myco ping` RTT fell from ~0.3 to ~0.2 ms on
    // loopback, and the agent's SSH bulk and keystroke figures improved too
    // (BENCHMARKS.md). The agent's blocking work (SFTP file I/O) and its commands run
    // outside that thread.
    let many_peers = is_server(&cli.command);
    let mut builder = if many_peers {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("myco: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The work runs as a spawned task, not as the future `block_on` polls: on a
    // current-thread runtime every wake-up of that future from the runtime's own thread
    // writes the runtime's eventfd and costs it a spurious return from epoll, which a
    // keystroke's round trip paid on about a third of keystrokes (bench/ssh.sh); a
    // spawned task is simply queued.
    quiet_on_closed_stdout();
    let result = runtime.block_on(async {
        tokio::spawn(run(cli, token_in_argv))
            .await
            .unwrap_or_else(|e| match e.try_into_panic() {
                Ok(payload) => match panic_message(payload.as_ref()) {
                    Some(m) if stdout_gone(m) => Ok(()),
                    Some(m) => Err(anyhow::anyhow!("myco stopped unexpectedly: {m}")),
                    None => Err(anyhow::anyhow!("myco stopped unexpectedly")),
                },
                Err(e) => Err(anyhow::anyhow!("myco stopped unexpectedly: {e}")),
            })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        // A remote command's exit code, passed on without a message.
        Err(e) if e.downcast_ref::<ExitWith>().is_some() => {
            ExitCode::from(e.downcast_ref::<ExitWith>().map_or(1, |c| c.0))
        }
        Err(e) => {
            eprintln!("myco: {}", mesh::error::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// A client flag typed before a command that does not talk to the coordinator
/// (`myco --url U server`), which would otherwise be ignored without a word.
fn misplaced_client_flag(matches: &clap::ArgMatches) -> Option<String> {
    let (name, _) = matches.subcommand()?;
    if !matches!(name, "server" | "completion" | "man") {
        return None;
    }
    let id = CLIENT_FLAGS
        .iter()
        .find(|id| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine))?;
    Some(format!(
        "--{} means nothing for `myco {name}`; drop it (see `myco {name} --help`)",
        id.replace('_', "-")
    ))
}

/// Whether the global `--token` came from the command line, at the top or after a
/// subcommand.
fn token_on_command_line(matches: &clap::ArgMatches) -> bool {
    let mut m = Some(matches);
    while let Some(here) = m {
        let has_token = here.ids().any(|id| id == "token");
        if has_token && here.value_source("token") == Some(clap::parser::ValueSource::CommandLine) {
            return true;
        }
        m = here.subcommand().map(|(_, sub)| sub);
    }
    false
}

async fn run(cli: Cli, token_in_argv: bool) -> anyhow::Result<()> {
    let top = cli.client;
    // A client command: its flags, else those given before it; trust set up first.
    let globals = |client: ClientArgs| -> anyhow::Result<Globals> {
        let client = client.or(top.clone());
        client.session.tls.apply()?;
        Ok(Globals {
            url: client.url,
            token: client.token,
            token_in_argv,
            config_dir: client.session.config_dir,
            tls: client.session.tls,
        })
    };
    match cli.command {
        #[cfg(feature = "server")]
        Command::Server(args) => cmd::server::run(args).await,
        Command::Agent(args) => cmd::agent::run(args, top, token_in_argv).await,
        Command::Ping(c) => cmd::ping::run(&globals(c.client)?, c.args).await,
        Command::Netcheck(c) => cmd::netcheck::run(&globals(c.client)?, c.args).await,
        Command::Speedtest(c) => cmd::speedtest::run(&globals(c.client)?, c.args).await,
        Command::PortForward(c) => cmd::port_forward::run(&globals(c.client)?, c.args).await,
        Command::Ssh(c) => cmd::ssh::ssh(&globals(c.client)?, c.args).await,
        Command::ConfigSsh(c) => cmd::ssh::config_ssh(&globals(c.client)?, c.args).await,
        Command::Login(c) => {
            let client = ClientArgs {
                session: c.session,
                ..ClientArgs::default()
            };
            cmd::login::login(&globals(client)?, c.args).await
        }
        Command::Logout(client) => cmd::login::logout(&globals(client)?).await,
        Command::Whoami(c) => cmd::login::whoami(&globals(c.client)?, c.args).await,
        Command::Completion { shell } => completion(shell),
        Command::Man { dir } => man_pages(&dir),
        Command::Users(g) => cmd::users::run(&globals(g.client)?, g.command).await,
        Command::Tokens(g) => cmd::tokens::run(&globals(g.client)?, g.command).await,
        Command::Create(c) => cmd::workspaces::create(&globals(c.client)?, c.args).await,
        Command::Ls(c) => cmd::workspaces::list(&globals(c.client)?, c.args).await,
        Command::Show(c) => cmd::workspaces::show(&globals(c.client)?, c.args).await,
        Command::Logs(c) => cmd::workspaces::logs(&globals(c.client)?, c.args).await,
        Command::Delete(c) => cmd::workspaces::delete(&globals(c.client)?, c.args).await,
        Command::Start(c) => cmd::lifecycle::start(&globals(c.client)?, c.args).await,
        Command::Stop(c) => cmd::lifecycle::stop(&globals(c.client)?, c.args).await,
        Command::Restart(c) => cmd::lifecycle::restart(&globals(c.client)?, c.args).await,
        Command::Cancel(c) => cmd::lifecycle::cancel(&globals(c.client)?, c.args).await,
        Command::Builds(c) => cmd::lifecycle::builds(&globals(c.client)?, c.args).await,
        Command::Schedule(g) => cmd::lifecycle::schedule(&globals(g.client)?, g.command).await,
        #[cfg(feature = "server")]
        Command::Provisioner(args) => cmd::provisioner::run(args).await,
        #[cfg(feature = "server")]
        Command::ProvisionerKeys(g) => cmd::provisioner::keys(&globals(g.client)?, g.command).await,
        Command::Templates(g) => cmd::lifecycle::templates(&globals(g.client)?, g.command).await,
        Command::RotateAgentToken(c) => cmd::workspaces::rotate(&globals(c.client)?, c.args).await,
        #[cfg(feature = "server")]
        Command::Scaletest(g) => cmd::scaletest::run(&globals(g.client)?, g.command).await,
    }
}

/// Help and version go to stdout as clap prints them; a usage error becomes one line.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return if e.use_stderr() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    eprintln!("myco: {first} (see `myco --help`)");
    ExitCode::from(2)
}

/// `println!` panics when stdout is a pipe whose reader has gone (`myco ping dev |
/// head -3`, or a coordinator whose log reader went away before it printed that it
/// stopped). That ends the command as a write error to a closed pipe does: quietly,
/// with success, instead of a panic message and a backtrace.
fn stdout_gone(message: &str) -> bool {
    message.starts_with("failed printing to stdout") && message.contains("Broken pipe")
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
}

/// The default panic hook, but silent for [`stdout_gone`].
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !panic_message(info.payload()).is_some_and(stdout_gone) {
            default(info);
        }
    }));
}

/// `myco ... | head` closing the pipe is not a failure.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn init_tracing(format: LogFormat, server: bool) {
    use tracing_subscriber::EnvFilter;
    // The server reports what it does; client commands stay quiet unless asked.
    // iroh logs connection teardown at error level; for a client command that is noise
    // on the one line the user reads, so its crates stay quiet unless RUST_LOG asks.
    // iroh opens an info-level span for every datagram it sends (`poll_send` in
    // `iroh::socket::transports`, a module with no info events of its own); the text
    // subscriber formats its fields each time, a measurable part of an agent's work
    // per keystroke. Its submodules keep their info events.
    let default = if server {
        "info,iroh_relay::server::client=error,iroh::socket::transports=warn,\
         iroh::socket::transports::relay=info,iroh::socket::transports::ip=info"
    } else {
        "warn,iroh=off,iroh_relay=off,noq=off,noq_proto=off,portmapper=off"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command of the tree builds: no two arguments share an id (clap checks
    /// a command only when it is used or documented).
    #[test]
    fn command_tree_is_consistent() {
        cli_command().debug_assert();
        let mut cmd = cli_command();
        cmd.build();
        // The agent takes its own --url and --token (MYCO_AGENT_URL, MYCO_AGENT_TOKEN).
        let meaningful: [(&str, &[&str]); 3] = [
            ("server", &[]),
            ("completion", &[]),
            ("agent", &["url", "token", "ca_cert_file", "insecure_http"]),
        ];
        for (name, flags) in meaningful {
            let sub = cmd.find_subcommand(name).unwrap();
            let listed: Vec<&str> = sub
                .get_arguments()
                .filter(|a| !a.is_hide_set())
                .map(|a| a.get_id().as_str())
                .filter(|id| CLIENT_FLAGS.contains(id))
                .collect();
            assert_eq!(listed, flags, "myco {name} --help");
        }
        let ls = cmd.find_subcommand("ls").unwrap();
        let listed = ls
            .get_arguments()
            .filter(|a| CLIENT_FLAGS.contains(&a.get_id().as_str()));
        assert_eq!(listed.count(), CLIENT_FLAGS.len(), "myco ls --help");
    }

    /// An `anyhow` chain printed through its `as_ref()` is `{:#}`'s, less the repeats.
    #[test]
    fn one_line_drops_causes_already_said() {
        let one_line = |e: &anyhow::Error| mesh::error::error_chain(e.as_ref());
        let inner = std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
        let e = anyhow::Error::new(inner)
            .context("timed out")
            .context("cannot connect to agent a/b.main: timed out")
            .context("cannot connect to agent a/b.main: timed out");
        assert_eq!(one_line(&e), "cannot connect to agent a/b.main: timed out");
        let e = anyhow::anyhow!("disk full").context("cannot write x");
        assert_eq!(one_line(&e), "cannot write x: disk full");
        // Only a whole cause is dropped, not a word that happens to end the line.
        let e = anyhow::anyhow!("x").context("cannot write x");
        assert_eq!(one_line(&e), "cannot write x: x");
    }
}
