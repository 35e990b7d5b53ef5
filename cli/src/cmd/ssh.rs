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
    #[arg(value_parser = dial::parse_target, value_name = "WORKSPACE")]
    target: WorkspaceRef,
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
}

pub async fn ssh(globals: &Globals, args: SshArgs) -> anyhow::Result<()> {
    let mut d = dial::dial(globals, &args.target, mesh::alpn::SSH, &args.mesh).await?;
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

/// Known-hosts lines for every agent with a reported host key.
fn known_hosts(workspaces: &[Workspace]) -> String {
    let mut out = String::new();
    for ws in workspaces {
        for agent in &ws.agents {
            let Some(key) = &agent.ssh_host_key else {
                continue;
            };
            let mut names = vec![format!("{HOST_PREFIX}{}.{}", ws.name, agent.name)];
            if ws.agents.len() == 1 {
                names.push(format!("{HOST_PREFIX}{}", ws.name));
            }
            out.push_str(&format!("{} {key}\n", names.join(",")));
        }
    }
    out
}

fn quote(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

/// The managed block.
fn block(myco: &Path, config_dir: &Path, known_hosts: &Path) -> String {
    format!(
        "{BEGIN}\n\
         # Managed by `myco config-ssh`; edits here are replaced. Host keys are pinned.\n\
         Host {HOST_PREFIX}*\n  \
           ProxyCommand {} --config-dir {} ssh --stdio %h\n  \
           UserKnownHostsFile {}\n  \
           StrictHostKeyChecking yes\n  \
           Ciphers aes256-gcm@openssh.com,chacha20-poly1305@openssh.com\n  \
           ConnectTimeout 0\n  \
           LogLevel ERROR\n\
         {END}\n",
        quote(myco),
        quote(config_dir),
        quote(known_hosts),
    )
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
    let old = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let new = splice(&old, &block(&myco, &config_dir, &known_path));
    let hosts = known_hosts(&workspaces);
    if args.dry_run {
        if old == new {
            println!("{} is up to date", path.display());
        } else {
            println!("would write this block to {}:", path.display());
            print!("{}", block(&myco, &config_dir, &known_path));
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
        "pinned {} host keys in {}; connect with `ssh {HOST_PREFIX}WORKSPACE`",
        hosts.lines().count(),
        known_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_keeps_user_lines_and_is_idempotent() {
        let user = "Host work\n  User me\n";
        let b = block(Path::new("/bin/myco"), Path::new("/c"), Path::new("/c/kh"));
        let once = splice(user, &b);
        assert!(once.starts_with(user));
        assert_eq!(splice(&once, &b), once);
        let changed = block(
            Path::new("/usr/bin/myco"),
            Path::new("/c"),
            Path::new("/c/kh"),
        );
        let twice = splice(&once, &changed);
        assert!(
            twice.starts_with(user)
                && twice.contains("/usr/bin/myco")
                && !twice.contains("\"/bin/myco\"")
        );
        assert_eq!(twice.matches(BEGIN).count(), 1);
    }
}
