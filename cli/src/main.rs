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
    /// URL of the coordinator; defaults to the one you logged in to.
    #[arg(long, global = true, env = "MYCO_URL")]
    url: Option<String>,

    /// API token to use instead of the saved session.
    #[arg(long, global = true, env = "MYCO_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Where the session file lives (default: $XDG_CONFIG_HOME/myco, i.e. ~/.config/myco).
    #[arg(long, global = true, env = "MYCO_CONFIG_DIR")]
    config_dir: Option<PathBuf>,

    /// A PEM file of CA certificates to trust for https:// and wss:// besides the
    /// system's (which SSL_CERT_FILE and SSL_CERT_DIR replace, as for curl).
    #[arg(long, global = true, env = "MYCO_CA_CERT_FILE")]
    ca_cert_file: Option<PathBuf>,

    /// Send passwords and tokens over plain http:// to a host that is not loopback
    /// (they cross the network readable by anyone on the path); warns when it does.
    #[arg(long, global = true, env = "MYCO_INSECURE_HTTP")]
    insecure_http: bool,

    /// Log format on stderr.
    #[arg(long, global = true, env = "MYCO_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
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
    Ping(cmd::ping::Args),
    /// Check this machine's network: UDP, public address, NAT kind, port mapping, relay
    /// latency; says what stands in the way of direct connections.
    Netcheck(cmd::netcheck::Args),
    /// Measure throughput to or from an agent over the mesh.
    Speedtest(cmd::speedtest::Args),
    /// Forward local TCP and UDP ports to ports in a workspace over the mesh.
    PortForward(cmd::port_forward::Args),
    /// Open a shell or run a command on an agent over SSH (`--stdio`: the raw SSH stream,
    /// for OpenSSH's ProxyCommand).
    Ssh(cmd::ssh::SshArgs),
    /// Write a `Host myco.*` block into your SSH config and pin the agents' host keys.
    ConfigSsh(cmd::ssh::ConfigSshArgs),
    /// Log in to a coordinator and save the session (creates the first user with --first-user).
    Login(cmd::login::LoginArgs),
    /// Revoke the saved session and delete it.
    Logout,
    /// Show who you are logged in as, and where.
    Whoami(output::OutputArgs),
    /// Manage users: admins create, disable, enable and delete them; anyone changes
    /// their own password or revokes their own sessions and tokens.
    #[command(subcommand)]
    Users(cmd::users::UsersCommand),
    /// Manage your named API tokens.
    #[command(subcommand)]
    Tokens(cmd::tokens::TokensCommand),
    /// Create a workspace and print each agent's token and start command.
    Create(cmd::workspaces::CreateArgs),
    /// List workspaces.
    #[command(visible_alias = "list")]
    Ls(cmd::workspaces::ListArgs),
    /// Show one workspace with its agents: status, lifecycle, apps' health, metadata.
    Show(cmd::workspaces::ShowArgs),
    /// Print an agent's startup and shutdown script output.
    Logs(cmd::workspaces::LogsArgs),
    /// Delete a workspace and revoke its agents' tokens.
    Delete(cmd::workspaces::DeleteArgs),
    /// Replace an agent's token (the old one stops working) and print the new one.
    RotateAgentToken(cmd::workspaces::RotateArgs),
    /// Load-test a coordinator with simulated agents and check what /metrics says.
    #[command(subcommand)]
    #[cfg(feature = "server")]
    Scaletest(cmd::scaletest::ScaletestCommand),
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
    use clap::CommandFactory;
    use std::io::Write;
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "myco", &mut out);
    // Written here, not by the generator, so a closed pipe ends quietly.
    std::io::stdout().write_all(&out)?;
    Ok(())
}

/// `myco man DIR`: one page per command, as clap_mangen renders them.
fn man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = Cli::command();
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
}

fn main() -> ExitCode {
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return usage_error(e),
    };
    let token_in_argv = token_on_command_line(&matches);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e.format(&mut Cli::command())),
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
            eprintln!("myco: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Whether the global `--token` came from the command line, at the top or after a
/// subcommand.
fn token_on_command_line(matches: &clap::ArgMatches) -> bool {
    let mut m = Some(matches);
    while let Some(here) = m {
        if here.value_source("token") == Some(clap::parser::ValueSource::CommandLine) {
            return true;
        }
        m = here.subcommand().map(|(_, sub)| sub);
    }
    false
}

async fn run(cli: Cli, token_in_argv: bool) -> anyhow::Result<()> {
    // Before any client is built: every TLS client of the process shares it.
    trust::init(cli.ca_cert_file.as_deref())?;
    client::allow_insecure_http(cli.insecure_http);
    let globals = Globals {
        url: cli.url,
        token: cli.token,
        token_in_argv,
        config_dir: cli.config_dir,
    };
    match cli.command {
        #[cfg(feature = "server")]
        Command::Server(args) => cmd::server::run(args).await,
        Command::Agent(args) => cmd::agent::run(&globals, args).await,
        Command::Ping(args) => cmd::ping::run(&globals, args).await,
        Command::Netcheck(args) => cmd::netcheck::run(&globals, args).await,
        Command::Speedtest(args) => cmd::speedtest::run(&globals, args).await,
        Command::PortForward(args) => cmd::port_forward::run(&globals, args).await,
        Command::Ssh(args) => cmd::ssh::ssh(&globals, args).await,
        Command::ConfigSsh(args) => cmd::ssh::config_ssh(&globals, args).await,
        Command::Login(args) => cmd::login::login(&globals, args).await,
        Command::Logout => cmd::login::logout(&globals).await,
        Command::Whoami(out) => cmd::login::whoami(&globals, out).await,
        Command::Completion { shell } => completion(shell),
        Command::Man { dir } => man_pages(&dir),
        Command::Users(c) => cmd::users::run(&globals, c).await,
        Command::Tokens(c) => cmd::tokens::run(&globals, c).await,
        Command::Create(args) => cmd::workspaces::create(&globals, args).await,
        Command::Ls(args) => cmd::workspaces::list(&globals, args).await,
        Command::Show(args) => cmd::workspaces::show(&globals, args).await,
        Command::Logs(args) => cmd::workspaces::logs(&globals, args).await,
        Command::Delete(args) => cmd::workspaces::delete(&globals, args).await,
        Command::RotateAgentToken(args) => cmd::workspaces::rotate(&globals, args).await,
        #[cfg(feature = "server")]
        Command::Scaletest(c) => cmd::scaletest::run(&globals, c).await,
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

/// The error and its causes on one line, as `{:#}` prints them, less the repeats: a
/// cause whose whole text already ends the line adds nothing (iroh's connect errors
/// wrap one another transparently, which printed "timed out: timed out: timed out").
/// Every error line meant for the user goes through here.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if line != text && !line.ends_with(&format!(": {text}")) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
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

    #[test]
    fn one_line_drops_causes_already_said() {
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
