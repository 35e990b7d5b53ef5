//! `myco create|ls|show|logs|delete|rotate-agent-token`: workspaces and their agents.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use mesh::api::{
    Agent, AgentSpec, AgentStats, App, AppHealth, CreateWorkspace, CreatedWorkspace, LogLine,
    RotatedAgentToken, Workspace,
};
use mesh::{Name, WorkspaceRef};
use serde::Deserialize;

use crate::Globals;
use crate::client::Client;
use crate::output::{self, Format, OutputArgs};

/// The agent a workspace gets when none is named.
const DEFAULT_AGENT: &str = "main";

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Name of the new workspace: 1-32 characters of a-z, 0-9 and -.
    name: String,
    /// An agent of the workspace (repeatable; default: one agent called "main").
    #[arg(long = "agent", value_name = "NAME")]
    agents: Vec<String>,
    /// An app, AGENT:SLUG=URL (AGENT may be left out when there is one agent; repeatable).
    #[arg(long = "app", value_name = "AGENT:SLUG=URL")]
    apps: Vec<String>,
    /// Read agents, apps, health checks and scripts from a TOML or JSON file.
    #[arg(long, value_name = "FILE")]
    from: Option<PathBuf>,
    /// Make it from a template (`myco templates ls`): its agents, and a machine its
    /// provisioner builds now (the start build's output follows on stderr).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["agents", "apps", "from"])]
    template: Option<String>,
    /// With --template: stop it after this long without activity instead of the
    /// template's TTL ("8h"; "manual": never).
    #[arg(long, value_name = "DUR", requires = "template")]
    ttl: Option<String>,
    /// With --template: return once the start build is queued.
    #[arg(long, requires = "template")]
    no_wait: bool,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Every user's workspaces (admins only).
    #[arg(short, long)]
    all: bool,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The workspace: [OWNER/]WORKSPACE.
    workspace: WorkspaceRef,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The agent: [OWNER/]WORKSPACE[.AGENT] (AGENT may be left out when there is one).
    agent: WorkspaceRef,
    /// A build's output instead (the latest without N): what the template's
    /// provisioner command printed.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "0")]
    build: Option<u64>,
    /// With --build: keep printing until the build ends.
    #[arg(short, long, requires = "build")]
    follow: bool,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// The workspace: [OWNER/]WORKSPACE.
    workspace: WorkspaceRef,
    /// Do not ask for confirmation.
    #[arg(short = 'y', long = "yes")]
    yes: bool,
    /// A template's workspace: remove it at once, without its delete build (its
    /// machine, if any, is left to you).
    #[arg(long)]
    orphan: bool,
    /// A template's workspace: return once its delete build is queued.
    #[arg(long)]
    no_wait: bool,
}

#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// The agent: [OWNER/]WORKSPACE[.AGENT] (AGENT may be left out when there is one).
    agent: WorkspaceRef,
    #[command(flatten)]
    out: OutputArgs,
}

/// The body of a `--from` file: the agents; the workspace name comes from the command line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkspaceFile {
    agents: Vec<AgentSpec>,
}

fn read_spec_file(path: &Path) -> anyhow::Result<Vec<AgentSpec>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let parsed: WorkspaceFile = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid workspace file", path.display()))?
    } else {
        toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a valid workspace file: {}",
                path.display(),
                e.to_string().replace('\n', " ")
            )
        })?
    };
    Ok(parsed.agents)
}

/// Builds the workspace spec from `--from`, `--agent` and `--app`.
fn build_spec(args: &CreateArgs) -> anyhow::Result<CreateWorkspace> {
    let name = Name::new(&args.name).context("bad workspace name")?;
    if let Some(t) = &args.template {
        return Ok(CreateWorkspace {
            name,
            agents: Vec::new(),
            template: Some(Name::new(t).context("bad --template")?),
            ttl: args.ttl.clone(),
        });
    }
    let mut agents = match &args.from {
        Some(p) => read_spec_file(p)?,
        None => Vec::new(),
    };
    for a in &args.agents {
        let name = Name::new(a).context("bad --agent")?;
        if agents.iter().any(|x| x.name == name) {
            bail!("agent {name} is given twice");
        }
        agents.push(AgentSpec {
            name,
            apps: Vec::new(),
            startup_script: None,
            shutdown_script: None,
            metadata: Vec::new(),
        });
    }
    if agents.is_empty() {
        agents.push(AgentSpec {
            name: Name::new(DEFAULT_AGENT)?,
            apps: Vec::new(),
            startup_script: None,
            shutdown_script: None,
            metadata: Vec::new(),
        });
    }
    for spec in &args.apps {
        let (agent, slug, url) = parse_app(spec)?;
        let target = match agent {
            Some(a) => agents.iter_mut().find(|x| x.name == a).with_context(|| {
                format!("--app {spec:?} names agent {a}, which is not in this workspace")
            })?,
            None if agents.len() == 1 => &mut agents[0],
            None => bail!("--app {spec:?} does not say which agent; write AGENT:SLUG=URL"),
        };
        target.apps.push(App {
            slug,
            url,
            healthcheck: None,
        });
    }
    Ok(CreateWorkspace {
        name,
        agents,
        template: None,
        ttl: None,
    })
}

/// Parses `[AGENT:]SLUG=URL`.
fn parse_app(spec: &str) -> anyhow::Result<(Option<Name>, Name, String)> {
    let (lhs, url) = spec.split_once('=').with_context(|| {
        format!("bad --app {spec:?}: write AGENT:SLUG=URL, e.g. main:web=http://localhost:8080")
    })?;
    let (agent, slug) = match lhs.split_once(':') {
        Some((a, s)) => (
            Some(Name::new(a).with_context(|| format!("bad agent in --app {spec:?}"))?),
            s,
        ),
        None => (None, lhs),
    };
    let slug = Name::new(slug).with_context(|| format!("bad app slug in --app {spec:?}"))?;
    Ok((agent, slug, url.to_owned()))
}

/// The API path of the workspace `r` names (the caller's own without an owner).
pub(crate) fn ws_path(r: &WorkspaceRef) -> String {
    let owner = r.owner.as_ref().map_or("me", Name::as_str);
    format!("/api/v1/workspaces/{owner}/{}", r.workspace)
}

pub async fn create(globals: &Globals, args: CreateArgs) -> anyhow::Result<()> {
    let spec = build_spec(&args)?;
    let client = Client::authenticated(globals)?;
    let created: CreatedWorkspace = client.post("/api/v1/workspaces", &spec).await?;
    if created.workspace.template.is_some() {
        return created_from_template(&client, created, &args).await;
    }
    if args.out.format == Format::Json {
        return output::json(&created);
    }
    let ws = &created.workspace;
    let n = ws.agents.len();
    println!(
        "created workspace {}/{} with {n} agent{}",
        ws.owner,
        ws.name,
        if n == 1 { "" } else { "s" }
    );
    println!(
        "start each agent inside the workspace with one of the lines below; its token is shown only this once:"
    );
    for t in &created.agent_tokens {
        println!();
        println!("  agent {}:", t.agent);
        println!("    in an image or a VM (downloads the agent from the coordinator):");
        println!("    {}", init_command(&created.access_url, &t.token));
        println!("    where myco is installed:");
        println!("    {}", agent_command(&created.access_url, &t.token));
    }
    Ok(())
}

/// A template's workspace: its start build runs; its output follows on stderr.
async fn created_from_template(
    client: &Client,
    created: CreatedWorkspace,
    args: &CreateArgs,
) -> anyhow::Result<()> {
    let ws = &created.workspace;
    let r = WorkspaceRef {
        owner: Some(ws.owner.clone()),
        workspace: ws.name.clone(),
        agent: None,
    };
    let number = ws.latest_build.as_ref().map_or(1, |b| b.number);
    if args.out.format != Format::Json {
        eprintln!(
            "created workspace {r} from template {}; building it (build {number})",
            ws.template.as_ref().map_or("?", |t| t.name.as_str())
        );
    }
    if !args.no_wait {
        let build = super::lifecycle::follow(client, &r, number, 0, &mut std::io::stderr()).await?;
        super::lifecycle::ended_well(&r, &build)?;
    }
    if args.out.format == Format::Json {
        let ws: Workspace = client.get(&ws_path(&r)).await?;
        return output::json(&ws);
    }
    if !args.no_wait {
        println!("{r}: running; `myco ssh {}` to get in", ws.name);
    }
    Ok(())
}

/// The line that starts an agent: the token goes in its environment, never in its
/// arguments, where every local user could read it in the process list.
fn agent_command(url: &str, token: &str) -> String {
    format!("MYCO_AGENT_TOKEN={token} myco agent --url {url}")
}

/// The line for an image or a VM: the coordinator's init script fetches, checks and
/// runs the agent; the token again in the environment (of `sh`), never an argument.
fn init_command(url: &str, token: &str) -> String {
    format!("curl -fsSL {url}/api/v1/init-script/linux/$(uname -m) | MYCO_AGENT_TOKEN={token} sh")
}

pub async fn list(globals: &Globals, args: ListArgs) -> anyhow::Result<()> {
    let client = Client::authenticated(globals)?;
    let path = if args.all {
        "/api/v1/workspaces?all=true"
    } else {
        "/api/v1/workspaces"
    };
    let list: Vec<Workspace> = client.get(path).await?;
    match args.out.format {
        Format::Json => output::json(&list),
        Format::Table => {
            if list.is_empty() {
                eprintln!("no workspaces yet; create one with `myco create NAME`");
                return Ok(());
            }
            let mut rows = Vec::new();
            for w in &list {
                for a in &w.agents {
                    rows.push(vec![
                        format!("{}/{}", w.owner, w.name),
                        w.state.as_str().to_owned(),
                        a.name.to_string(),
                        a.status.to_string(),
                        a.lifecycle_state.to_string(),
                        apps_summary(a),
                        connection_kind(a.stats.as_ref()),
                        w.created_at.to_string(),
                    ]);
                }
            }
            output::table(
                &[
                    "WORKSPACE",
                    "STATE",
                    "AGENT",
                    "STATUS",
                    "LIFECYCLE",
                    "APPS",
                    "CONNECTIONS",
                    "CREATED",
                ],
                &rows,
            )
        }
    }
}

/// `2/3 healthy`, `1 unhealthy`, `-` without apps: how many checked apps are healthy,
/// and whether any is not.
fn apps_summary(a: &Agent) -> String {
    if a.apps.is_empty() {
        return "-".into();
    }
    let count = |h: AppHealth| a.apps_health.values().filter(|x| **x == h).count();
    let checked = a
        .apps_health
        .values()
        .filter(|h| **h != AppHealth::Disabled)
        .count();
    if checked == 0 {
        return format!("{} unchecked", a.apps.len());
    }
    let mut s = format!("{}/{checked} healthy", count(AppHealth::Healthy));
    for h in [AppHealth::Unhealthy, AppHealth::Initializing] {
        if count(h) > 0 {
            s.push_str(&format!(", {} {h}", count(h)));
        }
    }
    s
}

/// How the agent's open mesh connections run: `2 direct`, `1 relayed`, `none`.
fn connection_kind(stats: Option<&AgentStats>) -> String {
    let Some(s) = stats else {
        return "-".into();
    };
    match (s.connections_direct, s.connections_relayed) {
        (0, 0) if s.connection_count == 0 => "none".into(),
        (0, 0) => format!("{} open", s.connection_count),
        (d, 0) => format!("{d} direct"),
        (0, r) => format!("{r} relayed"),
        (d, r) => format!("{d} direct, {r} relayed"),
    }
}

pub async fn show(globals: &Globals, args: ShowArgs) -> anyhow::Result<()> {
    if args.workspace.agent.is_some() {
        bail!("show takes a workspace, not an agent: drop the .AGENT part");
    }
    let client = Client::authenticated(globals)?;
    let ws: Workspace = client.get(&ws_path(&args.workspace)).await?;
    if args.out.format == Format::Json {
        return output::json(&ws);
    }
    println!("workspace  {}/{}", ws.owner, ws.name);
    println!("created    {}", ws.created_at);
    for a in &ws.agents {
        println!();
        println!("agent {}", a.name);
        let since = match (a.status, a.last_connected_at, a.disconnected_at) {
            (mesh::api::AgentStatus::Connected, Some(t), _) => format!(" (last heard {t})"),
            (mesh::api::AgentStatus::Disconnected, _, Some(t)) => format!(" (since {t})"),
            (mesh::api::AgentStatus::Disconnected, Some(t), None) => {
                format!(" (last heard {t})")
            }
            _ => String::new(),
        };
        println!("  status: {}{since}", a.status);
        let changed = a
            .lifecycle_changed_at
            .map(|t| format!(" (since {t})"))
            .unwrap_or_default();
        println!("  lifecycle: {}{changed}", a.lifecycle_state);
        if let Some(s) = &a.stats {
            println!(
                "  connections: {}, median latency {:.1} ms; sessions: {} ssh, {} vscode, {} jetbrains, {} port-forward",
                connection_kind(Some(s)),
                s.connection_median_latency_ms,
                s.session_count_ssh,
                s.session_count_vscode,
                s.session_count_jetbrains,
                s.session_count_port_forward,
            );
        }
        if let Some(n) = &a.netcheck {
            println!(
                "  network: {} (netcheck at {}, {})",
                n.report.summary(),
                n.checked_at,
                n.reason
            );
        }
        if a.apps.is_empty() {
            println!("  apps: none");
        }
        for app in &a.apps {
            let hc = app
                .healthcheck
                .as_ref()
                .map(|h| {
                    format!(
                        " (health: {} every {}s, unhealthy after {} failures)",
                        h.url, h.interval, h.threshold
                    )
                })
                .unwrap_or_default();
            let health = a.apps_health.get(&app.slug).copied().unwrap_or_default();
            println!("  app {}  {}  {health}{hc}", app.slug, app.url);
        }
        for (kind, s) in [
            ("startup", &a.startup_script),
            ("shutdown", &a.shutdown_script),
        ] {
            if let Some(s) = s {
                let first = s.run.lines().next().unwrap_or_default();
                println!("  {kind} script (timeout {}s): {first}", s.timeout);
            }
        }
        for m in &a.metadata {
            let value = m.value.lines().next().unwrap_or_default();
            match &m.error {
                Some(e) => println!("  {}: {value} (error: {e})", m.key),
                None => println!("  {}: {value}", m.key),
            }
        }
    }
    Ok(())
}

/// The agent a `WS[.AGENT]` names: the given one, or the workspace's only agent.
async fn agent_of(client: &Client, r: &WorkspaceRef) -> anyhow::Result<Name> {
    if let Some(a) = &r.agent {
        return Ok(a.clone());
    }
    let ws: Workspace = client.get(&ws_path(r)).await?;
    match ws.agents.as_slice() {
        [one] => Ok(one.name.clone()),
        _ => bail!(
            "workspace {r} has {} agents; name one as WORKSPACE.AGENT",
            ws.agents.len()
        ),
    }
}

pub async fn logs(globals: &Globals, args: LogsArgs) -> anyhow::Result<()> {
    let client = Client::authenticated(globals)?;
    let r = &args.agent;
    if let Some(n) = args.build {
        let number = (n != 0).then_some(n);
        let json = args.out.format == Format::Json;
        return super::lifecycle::build_logs(&client, r, number, args.follow, json).await;
    }
    let agent = agent_of(&client, r).await?;
    let lines: Vec<LogLine> = client
        .get(&format!("{}/agents/{agent}/logs", ws_path(r)))
        .await?;
    if args.out.format == Format::Json {
        return output::json(&lines);
    }
    if lines.is_empty() {
        eprintln!("agent {agent} of {r} has no script output (yet)");
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    for l in &lines {
        let source = match l.source {
            mesh::api::LogSource::Startup => "startup",
            mesh::api::LogSource::Shutdown => "shutdown",
        };
        if let Err(e) = writeln!(out, "{} {source:<8} {}", l.at, l.text) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(e.into());
        }
    }
    Ok(())
}

pub async fn delete(globals: &Globals, args: DeleteArgs) -> anyhow::Result<()> {
    let r = &args.workspace;
    if r.agent.is_some() {
        bail!("delete takes a workspace, not an agent: drop the .AGENT part");
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            bail!("refusing to delete workspace {r} without confirmation; pass -y");
        }
        let answer = super::prompt_line(
            &format!(
                "Delete workspace {r} and revoke its agents' tokens? Type its name to confirm: "
            ),
            "-y",
        )?;
        if answer != r.workspace.as_str() {
            bail!("not deleted: the answer did not match {}", r.workspace);
        }
    }
    let client = Client::authenticated(globals)?;
    let path = if args.orphan {
        format!("{}?orphan=true", ws_path(r))
    } else {
        ws_path(r)
    };
    let build: Option<mesh::api::Build> = client.call_maybe(reqwest::Method::DELETE, &path).await?;
    // A template's workspace goes when its delete build succeeds.
    if let Some(build) = build {
        if args.no_wait {
            eprintln!(
                "queued build {} (delete) of {r}; follow it with `myco logs {r} --build {} --follow`",
                build.number, build.number
            );
            return Ok(());
        }
        let followed =
            super::lifecycle::follow(&client, r, build.number, 0, &mut std::io::stderr()).await;
        match followed {
            Ok(build) => super::lifecycle::ended_well(r, &build)?,
            // A delete that succeeded takes the workspace and its builds with it.
            Err(e) => {
                let gone = client
                    .get::<Workspace>(&ws_path(r))
                    .await
                    .is_err_and(|e| e.to_string().contains("not found"));
                if !gone {
                    return Err(e);
                }
            }
        }
    }
    println!("deleted workspace {r}");
    Ok(())
}

pub async fn rotate(globals: &Globals, args: RotateArgs) -> anyhow::Result<()> {
    let client = Client::authenticated(globals)?;
    let r = &args.agent;
    let agent = agent_of(&client, r).await?;
    let rotated: RotatedAgentToken = client
        .post(
            &format!("{}/agents/{agent}/token", ws_path(r)),
            &serde_json::json!({}),
        )
        .await?;
    if args.out.format == Format::Json {
        return output::json(&rotated);
    }
    println!(
        "rotated the token of agent {agent}; the old token no longer works. Restart the agent with:"
    );
    println!(
        "    {}",
        agent_command(&rotated.access_url, &rotated.agent_token.token)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(agents: &[&str], apps: &[&str]) -> CreateArgs {
        CreateArgs {
            name: "dev".into(),
            agents: agents.iter().map(|s| s.to_string()).collect(),
            apps: apps.iter().map(|s| s.to_string()).collect(),
            from: None,
            template: None,
            ttl: None,
            no_wait: false,
            out: OutputArgs {
                format: Format::Table,
            },
        }
    }

    #[test]
    fn default_agent_and_short_app_form() {
        let spec = build_spec(&args(&[], &["web=http://localhost:8080"])).unwrap();
        assert_eq!(spec.agents.len(), 1);
        assert_eq!(spec.agents[0].name.as_str(), "main");
        assert_eq!(spec.agents[0].apps[0].slug.as_str(), "web");
    }

    #[test]
    fn apps_need_an_agent_when_there_are_several() {
        let err = build_spec(&args(&["a", "b"], &["web=http://x"])).unwrap_err();
        assert!(err.to_string().contains("which agent"), "{err}");
        let spec = build_spec(&args(&["a", "b"], &["b:web=http://x"])).unwrap();
        assert_eq!(spec.agents[1].apps.len(), 1);
        let err = build_spec(&args(&["a"], &["c:web=http://x"])).unwrap_err();
        assert!(err.to_string().contains("not in this workspace"), "{err}");
    }

    #[test]
    fn reads_toml_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ws.toml");
        std::fs::write(
            &p,
            r#"
[[agents]]
name = "main"
startup_script = { run = "echo hi", timeout = 60 }

[[agents.apps]]
slug = "code"
url = "http://localhost:8080"
healthcheck = { url = "http://localhost:8080/healthz", interval = 5, threshold = 2 }
"#,
        )
        .unwrap();
        let mut a = args(&[], &[]);
        a.from = Some(p.clone());
        let spec = build_spec(&a).unwrap();
        assert_eq!(
            spec.agents[0].apps[0]
                .healthcheck
                .as_ref()
                .unwrap()
                .threshold,
            2
        );
        std::fs::write(&p, "[[agents]]\nname = \"main\"\ncolour = 1\n").unwrap();
        let err = build_spec(&a).unwrap_err();
        assert!(format!("{err:#}").contains("colour"), "{err:#}");
    }
}
