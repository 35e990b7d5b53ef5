//! `myco ssh` (a shell or command on an agent, see `ssh_client`), `myco ssh --stdio`
//! (an SSH byte stream for OpenSSH's ProxyCommand) and `myco config-ssh` (the managed
//! `Host myco.*` block and pinned host keys).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use mesh::WorkspaceRef;
use mesh::api::Workspace;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use crate::Globals;
use crate::client::Client;
use crate::dial::{self, HOST_PREFIX, MeshArgs};
use crate::stdio::{Output, Stream};

/// Bytes gathered from the agent before one write to stdout.
const CHUNK: usize = 256 * 1024;
const BEGIN: &str = "# ------------START-MYCO-----------";
const END: &str = "# ------------END-MYCO------------";

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  myco ssh dev                          a login shell on dev's agent
  myco ssh dev -- make test             run a command; its exit code becomes myco's
  myco ssh -A -R 8080:localhost:3000 dev
                                        forward your ssh-agent, and the workspace's
                                        port 8080 back to your localhost:3000
  myco ssh -e RUST_LOG=debug dev.main -- cargo run

The agent's host key is checked against the coordinator's record. On a terminal,
OpenSSH's escapes work at the start of a line: ~. ends the session (exit 255, for a
link that hangs), ~? lists the escapes, ~~ sends one ~.")]
pub struct SshArgs {
    /// The agent: [OWNER/]WORKSPACE[.AGENT], or the host alias myco.WORKSPACE[.AGENT].
    #[arg(value_name = "WORKSPACE")]
    target: String,
    /// The host alias prefix config-ssh wrote (its --ssh-host-prefix), stripped from
    /// the target.
    #[arg(long, hide = true, default_value = HOST_PREFIX, value_parser = parse_host_prefix)]
    host_prefix: String,
    /// The command to run instead of a login shell (put it after `--`).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    command: Vec<String>,
    /// Carry the SSH byte stream on stdin/stdout (for OpenSSH's ProxyCommand).
    #[arg(long, conflicts_with_all = ["command", "forward_agent", "remote_forward", "env", "tty", "no_tty"])]
    stdio: bool,
    /// Forward your SSH agent (SSH_AUTH_SOCK) into the session.
    #[arg(short = 'A', long)]
    forward_agent: bool,
    /// Listen on the agent's [BIND:]PORT (loopback by default; 0 picks one) and carry
    /// each connection back to HOST:HOSTPORT on this machine. Repeatable.
    #[arg(short = 'R', long, value_name = "[BIND:]PORT:HOST:HOSTPORT")]
    remote_forward: Vec<crate::ssh_client::RemoteForward>,
    /// Set an environment variable in the session. Repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Ask for a terminal even for a command or when stdin is not one.
    #[arg(short = 't', long, conflicts_with = "no_tty")]
    tty: bool,
    /// Never ask for a terminal.
    #[arg(short = 'T', long)]
    no_tty: bool,
    /// For OpenSSH's KnownHostsCommand (config-ssh writes it): print the
    /// coordinator's record of the host key of a workspace not pinned yet, and pin it.
    #[arg(long, hide = true, conflicts_with_all = ["command", "stdio"])]
    known_hosts: bool,
    #[command(flatten)]
    mesh: MeshArgs,
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains(char::is_whitespace) => {
            Ok((k.to_owned(), v.to_owned()))
        }
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

#[derive(Debug, clap::Args)]
pub struct ConfigSshArgs {
    /// The SSH config file to manage (default: ~/.ssh/config).
    #[arg(long, value_name = "PATH")]
    ssh_config_file: Option<PathBuf>,
    /// Show what would change and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(short = 'y', long = "yes")]
    yes: bool,
    /// The prefix of the host aliases (`ssh PREFIXWORKSPACE`), e.g. `coder.` or
    /// `dev-`: letters, digits, `.`, `-` and `_`.
    #[arg(long, default_value = HOST_PREFIX, value_parser = parse_host_prefix)]
    ssh_host_prefix: String,
    /// Another option for the `Host myco.*` block, e.g. ForwardAgent=yes. Repeatable.
    #[arg(short = 'o', long = "ssh-option", value_name = "KEY=VALUE", value_parser = parse_ssh_option)]
    ssh_options: Vec<String>,
}

pub async fn ssh(globals: &Globals, args: SshArgs) -> anyhow::Result<()> {
    let target: WorkspaceRef = args
        .target
        .strip_prefix(args.host_prefix.as_str())
        .map_or_else(|| dial::parse_target(&args.target), str::parse)
        .with_context(|| format!("bad workspace {:?}", args.target))?;
    if args.known_hosts {
        return known_hosts_command(globals, &target, &args.host_prefix).await;
    }
    let mut d = dial::dial(globals, &target, mesh::alpn::SSH, &args.mesh).await?;
    if !args.stdio {
        let command = match args.command.as_slice() {
            [] => None,
            // One word is passed as is, so `-- 'a; b'` keeps its shell syntax.
            [one] => Some(one.clone()),
            words => Some(words.join(" ")),
        };
        let req = crate::ssh_client::Request {
            command,
            env: args.env,
            forward_agent: args.forward_agent,
            remote_forwards: args.remote_forward,
            tty: match (args.tty, args.no_tty) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
        };
        let code = crate::ssh_client::run(d, req).await?;
        if code != 0 {
            return Err(crate::ExitWith(code).into());
        }
        return Ok(());
    }
    // Bytes are moved in large chunks: OpenSSH's writes are at most 32 KiB and QUIC
    // hands out about a packet per read, so both sides are gathered before a write.
    // Stdin is read straight into the buffer the QUIC stream sends, without a copy.
    // (Reading QUIC's own chunks and writing them with one `writev` instead of
    // gathering them here showed no gain: BENCHMARKS.md, "The IDE path".)
    let mut input = crate::stdio::Input::stdin();
    let mut output = Output::stdout();
    {
        let upload = async {
            while let Some(chunk) = input.recv().await {
                d.send.write_chunk(chunk).await?;
            }
            d.send.finish()?;
            anyhow::Ok(())
        };
        let download = async {
            let mut buf = BytesMut::new();
            loop {
                buf.reserve(CHUNK);
                match d.recv.read_buf(&mut buf).await? {
                    0 => break,
                    _ => output.write(Stream::Stdout, buf.split().freeze()).await?,
                }
            }
            anyhow::Ok(())
        };
        // The session ends when the agent ends its side; stdin may stay open after that.
        tokio::pin!(upload, download);
        let mut uploading = true;
        loop {
            tokio::select! {
                r = &mut download => {
                    r.context("the SSH stream from the agent broke off")?;
                    break;
                }
                r = &mut upload, if uploading => {
                    r.context("the SSH stream to the agent broke off")?;
                    uploading = false;
                }
            }
        }
        // The agent ended a session OpenSSH had not: say why, if it said, on the
        // stderr OpenSSH shows.
        if uploading && let Some(why) = dial::agent_reason(&d.conn).await {
            eprintln!("myco: {why}");
        }
    }
    output.finish().await?;
    d.conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), d.mesh.endpoint.close()).await;
    Ok(())
}

fn default_ssh_config() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set; pass --ssh-config-file")?;
    Ok(PathBuf::from(home).join(".ssh").join("config"))
}

/// `myco ssh --known-hosts HOST`, OpenSSH's KnownHostsCommand: for a host not in
/// config-ssh's known_hosts file yet (a workspace made after the last config-ssh),
/// prints the coordinator's record of its key and pins it in that file, so OpenSSH
/// checks the agent against it now and a later change is refused like any other.
/// For a pinned host it prints nothing: the file decides.
async fn known_hosts_command(
    globals: &Globals,
    target: &WorkspaceRef,
    prefix: &str,
) -> anyhow::Result<()> {
    let config_dir = crate::session::config_dir(globals)?;
    let known_path = config_dir.join("known_hosts");
    let host = format!("{prefix}{target}");
    let pinned = std::fs::read_to_string(&known_path).unwrap_or_default();
    let names_of = |line: &str| -> Vec<String> {
        line.split_whitespace()
            .next()
            .map(|n| n.split(',').map(str::to_owned).collect())
            .unwrap_or_default()
    };
    if pinned.lines().any(|l| names_of(l).contains(&host)) {
        return Ok(());
    }
    let client = Client::authenticated(globals)?;
    let workspaces: Vec<Workspace> = client.get("/api/v1/workspaces").await?;
    let Some(line) = known_hosts(&workspaces, prefix)
        .lines()
        .find(|l| names_of(l).contains(&host))
        .map(str::to_owned)
    else {
        // Nothing recorded: OpenSSH, finding no key, refuses the host.
        return Ok(());
    };
    let mut text = pinned;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&line);
    text.push('\n');
    crate::dirs::write_private(&known_path, text.as_bytes())?;
    println!("{line}");
    Ok(())
}

/// Where `path` leads through symlinks, even when the last one dangles.
fn follow_symlinks(path: &Path) -> anyhow::Result<PathBuf> {
    let mut path = path.to_owned();
    for _ in 0..40 {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            return Ok(path);
        };
        if !meta.file_type().is_symlink() {
            return Ok(path);
        }
        let link = std::fs::read_link(&path)
            .with_context(|| format!("cannot read the symlink {}", path.display()))?;
        path = match path.parent() {
            Some(dir) if link.is_relative() => dir.join(link),
            _ => link,
        };
    }
    bail!("{} is a loop of symlinks", path.display())
}

/// Known-hosts lines for every agent with a reported host key, named as
/// `PREFIX`WS.AGENT (and `PREFIX`WS for a workspace's only agent).
fn known_hosts(workspaces: &[Workspace], prefix: &str) -> String {
    let mut out = String::new();
    for ws in workspaces {
        for agent in &ws.agents {
            let Some(key) = &agent.ssh_host_key else {
                continue;
            };
            let mut names = vec![format!("{prefix}{}.{}", ws.name, agent.name)];
            if ws.agents.len() == 1 {
                names.push(format!("{prefix}{}", ws.name));
            }
            out.push_str(&format!("{} {key}\n", names.join(",")));
        }
    }
    out
}

fn quote(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

/// What the managed block is made of.
struct BlockParts<'a> {
    myco: &'a Path,
    config_dir: &'a Path,
    known_hosts: &'a Path,
    /// `myco`'s TLS flags ([`crate::TlsArgs::flags`]), each already quoted.
    tls_flags: &'a [String],
    /// The user's `--ssh-option` lines.
    options: &'a [String],
    prefix: &'a str,
}

/// The managed block for hosts `prefix`*.
fn block(parts: &BlockParts) -> String {
    let BlockParts {
        myco,
        config_dir,
        known_hosts,
        tls_flags,
        options,
        prefix,
    } = *parts;
    let extra: String = options.iter().map(|o| format!("  {o}\n")).collect();
    // `myco ssh` strips the default prefix by itself; another one it is told.
    let strip = if prefix == HOST_PREFIX {
        String::new()
    } else {
        format!(" --host-prefix {prefix}")
    };
    // What trusts the coordinator goes with the commands: OpenSSH runs them without
    // this shell's environment (an IDE's ssh has none of it).
    let tls: String = tls_flags.iter().map(|f| format!(" {f}")).collect();
    format!(
        "{BEGIN}\n\
         # Managed by `myco config-ssh`; edits here are replaced. Host keys are pinned;\n\
         # a workspace made later is pinned from the coordinator's record at first use.\n\
         Host {prefix}*\n  \
           ProxyCommand {} --config-dir {}{tls} ssh --stdio{strip} %h\n  \
           UserKnownHostsFile {}\n  \
           KnownHostsCommand {} --config-dir {}{tls} ssh --known-hosts{strip} %H\n  \
           StrictHostKeyChecking yes\n  \
           Ciphers aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com\n  \
           ConnectTimeout 0\n  \
           LogLevel ERROR\n\
         {extra}\
         {END}\n",
        quote(myco),
        quote(config_dir),
        quote(known_hosts),
        quote(myco),
        quote(config_dir),
    )
}

/// A host alias prefix: safe in an ssh_config `Host` pattern and in a command line.
fn parse_host_prefix(text: &str) -> Result<String, String> {
    if text.is_empty()
        || text.len() > 32
        || !text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(format!(
            "{text:?} is not a host prefix; use up to 32 letters, digits, '.', '-' or '_', e.g. myco."
        ));
    }
    Ok(text.to_owned())
}

/// An `--ssh-option`: `Key Value` or `Key=Value`, one line, as ssh_config takes it.
fn parse_ssh_option(text: &str) -> Result<String, String> {
    let text = text.trim();
    let (key, value) = text
        .split_once(['=', ' '])
        .map(|(k, v)| (k.trim(), v.trim()))
        .ok_or_else(|| format!("{text:?} is not an SSH option; write it like ForwardAgent=yes"))?;
    if key.is_empty()
        || value.is_empty()
        || !key.chars().all(|c| c.is_ascii_alphanumeric())
        || text.contains(['\n', '\r'])
    {
        return Err(format!(
            "{text:?} is not an SSH option; write it like ForwardAgent=yes"
        ));
    }
    Ok(format!("{key} {value}"))
}

/// `text` with the managed block replaced (or appended), the user's lines untouched.
fn splice(text: &str, block: &str) -> String {
    if let (Some(start), Some(end)) = (text.find(BEGIN), text.find(END))
        && start < end
    {
        let after = end + END.len();
        let after = text[after..]
            .strip_prefix('\n')
            .map_or(after, |_| after + 1);
        return format!("{}{block}{}", &text[..start], &text[after..]);
    }
    let mut out = text.to_owned();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(block);
    out
}

pub async fn config_ssh(globals: &Globals, args: ConfigSshArgs) -> anyhow::Result<()> {
    let client = Client::authenticated(globals)?;
    let workspaces: Vec<Workspace> = client.get("/api/v1/workspaces").await?;
    let config_dir = std::path::absolute(crate::session::config_dir(globals)?)?;
    let known_path = config_dir.join("known_hosts");
    let myco = std::env::current_exe().context("cannot find the path of this myco binary")?;
    let path = match args.ssh_config_file {
        Some(p) => p,
        None => default_ssh_config()?,
    };
    // A config that is a symlink (dotfile managers) is edited where it points, not
    // replaced by a file.
    let path = follow_symlinks(&path)?;
    let old = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let tls_flags = globals.tls.flags()?;
    let parts = BlockParts {
        myco: &myco,
        config_dir: &config_dir,
        known_hosts: &known_path,
        tls_flags: &tls_flags,
        options: &args.ssh_options,
        prefix: &args.ssh_host_prefix,
    };
    let new = splice(&old, &block(&parts));
    let hosts = known_hosts(&workspaces, &args.ssh_host_prefix);
    if args.dry_run {
        if old == new {
            println!("{} is up to date", path.display());
        } else {
            println!("would write this block to {}:", path.display());
            print!("{}", block(&parts));
        }
        println!(
            "would pin {} host keys in {}",
            hosts.lines().count(),
            known_path.display()
        );
        return Ok(());
    }
    if old != new && !args.yes {
        if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            bail!(
                "refusing to change {} without confirmation; pass -y (or --dry-run to see the change)",
                path.display()
            );
        }
        let answer = super::prompt_line(&format!("Update {}? [y/N] ", path.display()), "-y")?;
        if !answer.eq_ignore_ascii_case("y") {
            bail!("not changed");
        }
    }
    crate::dirs::write_private(&known_path, hosts.as_bytes())?;
    if old != new {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        crate::dirs::write_private(&path, new.as_bytes())?;
        println!("updated {}", path.display());
    } else {
        println!("{} is up to date", path.display());
    }
    println!(
        "pinned {} host keys in {}; connect with `ssh {}WORKSPACE`",
        hosts.lines().count(),
        known_path.display(),
        args.ssh_host_prefix
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_keeps_user_lines_and_is_idempotent() {
        let user = "Host work\n  User me\n";
        let parts = BlockParts {
            myco: Path::new("/bin/myco"),
            config_dir: Path::new("/c"),
            known_hosts: Path::new("/c/kh"),
            tls_flags: &[],
            options: &[],
            prefix: HOST_PREFIX,
        };
        let b = block(&parts);
        let once = splice(user, &b);
        assert!(once.starts_with(user));
        assert_eq!(splice(&once, &b), once);
        let changed = block(&BlockParts {
            myco: Path::new("/usr/bin/myco"),
            options: &["ForwardAgent yes".to_owned()],
            tls_flags: &["--insecure-http".to_owned()],
            ..parts
        });
        let twice = splice(&once, &changed);
        assert!(
            twice.starts_with(user)
                && twice.contains("/usr/bin/myco")
                && !twice.contains("\"/bin/myco\"")
                && twice.contains("--config-dir \"/c\" --insecure-http ssh --stdio %h")
        );
        assert_eq!(twice.matches(BEGIN).count(), 1);
    }
}
