//! `myco templates ...`, `myco start|stop|restart`, `myco builds`, and following a
//! build's output (`create --template`, `delete`, `logs --build --follow`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use mesh::api::{
    Build, BuildLogs, BuildStatus, CreateBuild, TEMPLATE_ARCHIVE_MAX, TEMPLATE_FILE, Template,
    TemplateSpec, Transition, Workspace,
};
use mesh::{Name, WorkspaceRef};

use super::workspaces::ws_path;
use crate::Globals;
use crate::client::Client;
use crate::output::{self, Format, OutputArgs};

#[derive(Debug, clap::Subcommand)]
pub enum TemplatesCommand {
    /// Push a template directory (admins): every push is a new version; workspaces
    /// keep the version they were made from.
    Push {
        /// The directory, with a template.toml at its root.
        dir: PathBuf,
        /// The template's name (default: the directory's).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List templates (their latest versions).
    #[command(visible_alias = "list")]
    Ls {
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Show a template: its agents, provisioner and schedule.
    Show {
        name: String,
        /// A version (default: the latest).
        #[arg(long)]
        version: Option<u64>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Delete a template and its versions (admins); refused while a workspace uses it.
    #[command(visible_alias = "rm")]
    Delete { name: String },
}

#[derive(Debug, clap::Args)]
pub struct TransitionArgs {
    /// The workspace: [OWNER/]WORKSPACE.
    workspace: WorkspaceRef,
    /// Queue the build and return, without waiting for it or showing its output.
    #[arg(long)]
    no_wait: bool,
}

#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// The workspace: [OWNER/]WORKSPACE.
    workspace: WorkspaceRef,
    /// The build (default: the latest).
    #[arg(long)]
    build: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct BuildsArgs {
    /// The workspace: [OWNER/]WORKSPACE.
    workspace: WorkspaceRef,
    #[command(flatten)]
    out: OutputArgs,
}

pub async fn templates(globals: &Globals, cmd: TemplatesCommand) -> anyhow::Result<()> {
    let client = Client::authenticated(globals)?;
    match cmd {
        TemplatesCommand::Push { dir, name, out } => {
            let name = match name {
                Some(n) => n,
                None => dir
                    .canonicalize()
                    .ok()
                    .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .context("cannot name the template after its directory; pass --name")?,
            };
            let name = Name::new(&name).context("bad template name (pass --name)")?;
            let archive = {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || pack(&dir)).await??
            };
            let pushed: Template = client
                .put_archive(&format!("/api/v1/templates/{name}"), archive)
                .await?;
            if out.format == Format::Json {
                return output::json(&pushed);
            }
            println!(
                "pushed template {} version {} ({} bytes)",
                pushed.name, pushed.version, pushed.size_bytes
            );
            Ok(())
        }
        TemplatesCommand::Ls { out } => {
            let list: Vec<Template> = client.get("/api/v1/templates").await?;
            if out.format == Format::Json {
                return output::json(&list);
            }
            if list.is_empty() {
                eprintln!("no templates yet; push one with `myco templates push DIR`");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|t| {
                    vec![
                        t.name.to_string(),
                        t.version.to_string(),
                        t.spec.schedule.ttl.clone().unwrap_or_else(|| "-".into()),
                        t.workspaces.to_string(),
                        t.created_by.to_string(),
                        t.created_at.to_string(),
                    ]
                })
                .collect();
            output::table(
                &[
                    "TEMPLATE",
                    "VERSION",
                    "TTL",
                    "WORKSPACES",
                    "PUSHED BY",
                    "PUSHED",
                ],
                &rows,
            )
        }
        TemplatesCommand::Show { name, version, out } => {
            let name = Name::new(&name).context("bad template name")?;
            let path = match version {
                Some(v) => format!("/api/v1/templates/{name}?version={v}"),
                None => format!("/api/v1/templates/{name}"),
            };
            let t: Template = client.get(&path).await?;
            if out.format == Format::Json {
                return output::json(&t);
            }
            println!("template {} version {}", t.name, t.version);
            println!("  pushed:      {} by {}", t.created_at, t.created_by);
            println!("  sha256:      {} ({} bytes)", t.sha256, t.size_bytes);
            println!("  provisioner: sh -c {:?}", t.spec.provisioner.run);
            println!(
                "  timeout:     {}",
                t.spec.provisioner.timeout.as_deref().unwrap_or("10m")
            );
            for (k, v) in &t.spec.provisioner.tags {
                println!("  needs tag:   {k}={v}");
            }
            println!(
                "  ttl:         {}",
                t.spec.schedule.ttl.as_deref().unwrap_or("none")
            );
            println!(
                "  activity:    {}",
                t.spec.schedule.activity_bump.as_deref().unwrap_or("1h")
            );
            let agents: Vec<String> = if t.spec.agents.is_empty() {
                vec!["main".into()]
            } else {
                t.spec.agents.iter().map(|a| a.name.to_string()).collect()
            };
            println!("  agents:      {}", agents.join(", "));
            Ok(())
        }
        TemplatesCommand::Delete { name } => {
            let name = Name::new(&name).context("bad template name")?;
            client
                .call(
                    reqwest::Method::DELETE,
                    &format!("/api/v1/templates/{name}"),
                )
                .await?;
            println!("deleted template {name}");
            Ok(())
        }
    }
}

/// The template directory as a tar archive: its regular files and directories
/// (links followed), `.git` left out, checked for a `template.toml` that parses.
fn pack(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let spec_path = dir.join(TEMPLATE_FILE);
    let text = std::fs::read_to_string(&spec_path).with_context(|| {
        format!(
            "cannot read {}; a template directory holds a {TEMPLATE_FILE}",
            spec_path.display()
        )
    })?;
    let spec: TemplateSpec = toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid: {}",
            spec_path.display(),
            e.to_string().replace('\n', " ")
        )
    })?;
    spec.validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", spec_path.display()))?;
    let mut builder = tar::Builder::new(Vec::new());
    let mut total = 0usize;
    add_dir(&mut builder, dir, Path::new(""), &mut total, 0)?;
    let archive = builder.into_inner().context("cannot pack the template")?;
    if archive.len() > TEMPLATE_ARCHIVE_MAX {
        bail!(
            "template {} is {} KiB packed, over the {} MiB a template may hold; leave big files out and fetch them from the provisioner command",
            dir.display(),
            archive.len() / 1024,
            TEMPLATE_ARCHIVE_MAX / (1024 * 1024)
        );
    }
    Ok(archive)
}

fn add_dir(
    builder: &mut tar::Builder<Vec<u8>>,
    root: &Path,
    rel: &Path,
    total: &mut usize,
    depth: usize,
) -> anyhow::Result<()> {
    if depth > 32 {
        bail!(
            "{} is nested too deep (a link loop?)",
            root.join(rel).display()
        );
    }
    let here = root.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&here)
        .with_context(|| format!("cannot read {}", here.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot read {}", here.display()))?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for e in entries {
        let name = e.file_name();
        if name == ".git" {
            continue;
        }
        let path = rel.join(&name);
        let full = root.join(&path);
        let meta =
            std::fs::metadata(&full).with_context(|| format!("cannot read {}", full.display()))?;
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        if meta.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            builder
                .append_data(&mut h, &path, std::io::empty())
                .with_context(|| format!("cannot pack {}", full.display()))?;
            add_dir(builder, root, &path, total, depth + 1)?;
        } else if meta.is_file() {
            *total += usize::try_from(meta.len()).unwrap_or(usize::MAX);
            if *total > TEMPLATE_ARCHIVE_MAX {
                bail!(
                    "template {} holds more than {} MiB (at {}); leave big files out",
                    root.display(),
                    TEMPLATE_ARCHIVE_MAX / (1024 * 1024),
                    path.display()
                );
            }
            use std::os::unix::fs::PermissionsExt;
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(meta.permissions().mode() & 0o755);
            h.set_size(meta.len());
            let f = std::fs::File::open(&full)
                .with_context(|| format!("cannot read {}", full.display()))?;
            builder
                .append_data(&mut h, &path, f)
                .with_context(|| format!("cannot pack {}", full.display()))?;
        }
    }
    Ok(())
}

/// The workspace `r` names, which must be a template's.
async fn workspace(client: &Client, r: &WorkspaceRef) -> anyhow::Result<Workspace> {
    if r.agent.is_some() {
        bail!("this takes a workspace, not an agent: drop the .AGENT part");
    }
    client.get(&ws_path(r)).await
}

/// Queues a build of `r` and, unless `no_wait`, shows its output on stderr until it
/// ends; fails when it did.
pub async fn transition(
    client: &Client,
    r: &WorkspaceRef,
    transition: Transition,
    no_wait: bool,
) -> anyhow::Result<Build> {
    let build: Build = client
        .post(
            &format!("{}/builds", ws_path(r)),
            &CreateBuild { transition },
        )
        .await?;
    if no_wait {
        eprintln!(
            "queued build {} ({}) of {r}; follow it with `myco logs {r} --build {} --follow`",
            build.number,
            transition.as_str(),
            build.number
        );
        return Ok(build);
    }
    let build = follow(client, r, build.number, 0, &mut std::io::stderr()).await?;
    ended_well(r, &build)?;
    Ok(build)
}

/// An error for a build that did not succeed, naming where its output is.
pub fn ended_well(r: &WorkspaceRef, build: &Build) -> anyhow::Result<()> {
    match build.status {
        BuildStatus::Succeeded => Ok(()),
        status => bail!(
            "build {} ({}) of {r} {}: {}; its output: `myco logs {r} --build {}`",
            build.number,
            build.transition.as_str(),
            match status {
                BuildStatus::Canceled => "was canceled",
                _ => "failed",
            },
            build.reason.as_deref().unwrap_or("no reason given"),
            build.number
        ),
    }
}

/// Writes build `number`'s output from line `after` on to `out` as it comes, until
/// the build ends; returns it as it ended.
pub async fn follow(
    client: &Client,
    r: &WorkspaceRef,
    number: u64,
    mut after: u64,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<Build> {
    loop {
        let logs: BuildLogs = client
            .get(&format!(
                "{}/builds/{number}/logs?after={after}&wait=20",
                ws_path(r)
            ))
            .await?;
        for l in &logs.lines {
            after = l.seq;
            if let Err(e) = writeln!(out, "{}", l.text) {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(logs.build);
                }
                return Err(e.into());
            }
        }
        if logs.build.status.is_done() && logs.lines.is_empty() {
            return Ok(logs.build);
        }
    }
}

pub async fn start(globals: &Globals, args: TransitionArgs) -> anyhow::Result<()> {
    run_transition(globals, args, &[Transition::Start]).await
}

pub async fn stop(globals: &Globals, args: TransitionArgs) -> anyhow::Result<()> {
    run_transition(globals, args, &[Transition::Stop]).await
}

pub async fn restart(globals: &Globals, args: TransitionArgs) -> anyhow::Result<()> {
    run_transition(globals, args, &[Transition::Stop, Transition::Start]).await
}

async fn run_transition(
    globals: &Globals,
    args: TransitionArgs,
    steps: &[Transition],
) -> anyhow::Result<()> {
    let client = Client::authenticated(globals)?;
    let r = &args.workspace;
    workspace(&client, r).await?;
    for (i, t) in steps.iter().enumerate() {
        // A restart waits for its stop, whatever --no-wait says.
        let wait = !args.no_wait || i + 1 < steps.len();
        let build = transition(&client, r, *t, !wait).await?;
        if wait {
            println!(
                "{r}: {} (build {})",
                match t {
                    Transition::Start => "running",
                    Transition::Stop => "stopped",
                    Transition::Delete => "deleted",
                },
                build.number
            );
        }
    }
    Ok(())
}

/// Build `number` of `ws`, or its latest.
fn build_number(ws: &Workspace, r: &WorkspaceRef, number: Option<u64>) -> anyhow::Result<u64> {
    match number {
        Some(n) => Ok(n),
        None => ws
            .latest_build
            .as_ref()
            .map(|b| b.number)
            .with_context(|| format!("{r} has no builds: it was made without a template")),
    }
}

/// `myco cancel WS`: a pending build ends at once, a running one's command is
/// stopped within seconds (SIGTERM, then SIGKILL).
pub async fn cancel(globals: &Globals, args: CancelArgs) -> anyhow::Result<()> {
    let client = Client::authenticated(globals)?;
    let r = &args.workspace;
    let ws = workspace(&client, r).await?;
    let number = build_number(&ws, r, args.build)?;
    let build: Build = client
        .post(
            &format!("{}/builds/{number}/cancel", ws_path(r)),
            &serde_json::json!({}),
        )
        .await?;
    if build.status.is_done() {
        println!("build {number} of {r} is {}", status_word(build.status));
    } else {
        println!("build {number} of {r}: its command is being stopped");
    }
    Ok(())
}

fn status_word(status: BuildStatus) -> &'static str {
    match status {
        BuildStatus::Pending => "pending",
        BuildStatus::Running => "running",
        BuildStatus::Succeeded => "succeeded",
        BuildStatus::Failed => "failed",
        BuildStatus::Canceled => "canceled",
    }
}

pub async fn builds(globals: &Globals, args: BuildsArgs) -> anyhow::Result<()> {
    let client = Client::authenticated(globals)?;
    let r = &args.workspace;
    workspace(&client, r).await?;
    let list: Vec<Build> = client.get(&format!("{}/builds", ws_path(r))).await?;
    if args.out.format == Format::Json {
        return output::json(&list);
    }
    if list.is_empty() {
        eprintln!("{r} has no builds: it was made without a template");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|b| {
            let took = match (b.started_at, b.ended_at) {
                (Some(s), Some(e)) => format!("{:.1}s", e.since(s).as_secs_f64()),
                _ => "-".into(),
            };
            vec![
                b.number.to_string(),
                b.transition.as_str().to_owned(),
                status_word(b.status).to_owned(),
                b.initiator
                    .as_ref()
                    .map_or_else(|| "(schedule)".to_owned(), ToString::to_string),
                b.created_at.to_string(),
                took,
                b.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    output::table(
        &[
            "BUILD",
            "TRANSITION",
            "STATUS",
            "BY",
            "QUEUED",
            "TOOK",
            "REASON",
        ],
        &rows,
    )
}

/// `myco logs WS --build [N] [--follow]`: a build's output on stdout (the latest
/// build's without N).
pub async fn build_logs(
    client: &Client,
    r: &WorkspaceRef,
    number: Option<u64>,
    follow_it: bool,
    json: bool,
) -> anyhow::Result<()> {
    let ws = workspace(client, r).await?;
    let number = build_number(&ws, r, number)?;
    if follow_it {
        let build = follow(client, r, number, 0, &mut std::io::stdout()).await?;
        return ended_well(r, &build);
    }
    let mut after = 0;
    let mut all = Vec::new();
    let build = loop {
        let logs: BuildLogs = client
            .get(&format!(
                "{}/builds/{number}/logs?after={after}",
                ws_path(r)
            ))
            .await?;
        let done = logs.lines.is_empty();
        if let Some(l) = logs.lines.last() {
            after = l.seq;
        }
        all.extend(logs.lines);
        if done {
            break logs.build;
        }
    };
    if json {
        return output::json(&BuildLogs { build, lines: all });
    }
    let mut out = std::io::stdout().lock();
    for l in &all {
        if let Err(e) = writeln!(out, "{}", l.text) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(e.into());
        }
    }
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
pub enum ScheduleCommand {
    /// Show when a workspace stops and starts by itself.
    Show {
        /// The workspace: [OWNER/]WORKSPACE.
        workspace: WorkspaceRef,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Stop it after this long without activity ("8h", "30m"), or "manual" for
    /// never; a running workspace's deadline becomes now + this.
    Stop {
        workspace: WorkspaceRef,
        /// A duration or "manual".
        after: String,
    },
    /// Move a running workspace's deadline to now + this.
    Extend {
        workspace: WorkspaceRef,
        /// A duration ("2h").
        by: String,
    },
    /// Start it on a schedule, e.g. "Mon-Fri 09:00 Europe/Berlin" (days Mon..Sun,
    /// ranges, commas or "daily"; HH:MM; an IANA time zone, default UTC), or
    /// "manual" for never.
    Start {
        workspace: WorkspaceRef,
        /// The schedule or "manual".
        when: String,
    },
}

pub async fn schedule(globals: &Globals, cmd: ScheduleCommand) -> anyhow::Result<()> {
    use mesh::api::{ScheduleChange, WorkspaceSchedule};
    let client = Client::authenticated(globals)?;
    let table = OutputArgs {
        format: Format::Table,
    };
    let change = |c: ScheduleChange| (Some(c), table.clone());
    let (r, (change, out)) = match cmd {
        ScheduleCommand::Show { workspace, out } => (workspace, (None, out)),
        ScheduleCommand::Stop { workspace, after } => (
            workspace,
            change(ScheduleChange {
                ttl: Some(after),
                ..Default::default()
            }),
        ),
        ScheduleCommand::Extend { workspace, by } => (
            workspace,
            change(ScheduleChange {
                extend: Some(by),
                ..Default::default()
            }),
        ),
        ScheduleCommand::Start { workspace, when } => (
            workspace,
            change(ScheduleChange {
                autostart: Some(when),
                ..Default::default()
            }),
        ),
    };
    let ws = workspace(&client, &r).await?;
    let schedule: WorkspaceSchedule = match change {
        Some(c) => {
            client
                .request(
                    reqwest::Method::PUT,
                    &format!("{}/schedule", ws_path(&r)),
                    Some(&c),
                )
                .await?
        }
        None => ws
            .schedule
            .with_context(|| format!("{r} was made without a template; it has no schedule"))?,
    };
    if out.format == Format::Json {
        return output::json(&schedule);
    }
    println!("{r}:");
    println!(
        "  auto-stop:  {}",
        schedule
            .ttl
            .as_deref()
            .map_or("manual".to_owned(), |t| format!(
                "{t} after start without activity (activity keeps it up {})",
                schedule.activity_bump
            ))
    );
    if let Some(d) = schedule.deadline {
        println!("  stops at:   {d}");
    }
    println!(
        "  auto-start: {}",
        schedule.autostart.as_deref().unwrap_or("manual")
    );
    if let Some(n) = schedule.next_start {
        println!("  next start: {n}");
    }
    Ok(())
}
