//! `myco provisioner`: runs workspace builds away from the coordinator (where the
//! cloud credentials live), and `myco provisioner-keys` (admins) for its key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use coordinator::provision::{self, BuildInput, Outcome};
use mesh::Name;
use mesh::api::{
    AcquireJob, BuildStatus, CreateProvisionerKey, CreatedProvisionerKey, JobLogs, JobUpdate,
    ProvisionerJob, ProvisionerKeyInfo, Renewed, Transition,
};
use tokio::sync::{mpsc, watch};
use tokio_util::task::AbortOnDropHandle;

use crate::Globals;
use crate::client::Client;
use crate::output::{self, Format, OutputArgs};

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a provisioner key (admins); printed once.
    Create {
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List provisioner keys (admins).
    #[command(visible_alias = "list")]
    Ls {
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Delete a provisioner key (admins): its provisioners are refused from their
    /// next request; their running builds fail when their lease runs out.
    #[command(visible_alias = "rm")]
    Delete { name: String },
}

pub async fn keys(globals: &Globals, cmd: KeysCommand) -> anyhow::Result<()> {
    let client = Client::authenticated(globals)?;
    match cmd {
        KeysCommand::Create { name, out } => {
            let name = Name::new(&name).context("bad provisioner key name")?;
            let created: CreatedProvisionerKey = client
                .post("/api/v1/provisioner-keys", &CreateProvisionerKey { name })
                .await?;
            if out.format == Format::Json {
                return output::json(&created);
            }
            eprintln!(
                "provisioner key {} (shown once; run `MYCO_PROVISIONER_KEY=... myco provisioner --url URL`):",
                created.name
            );
            println!("{}", created.key);
            Ok(())
        }
        KeysCommand::Ls { out } => {
            let keys: Vec<ProvisionerKeyInfo> = client.get("/api/v1/provisioner-keys").await?;
            if out.format == Format::Json {
                return output::json(&keys);
            }
            let rows: Vec<Vec<String>> = keys
                .iter()
                .map(|k| {
                    vec![
                        k.name.to_string(),
                        k.created_by.to_string(),
                        k.created_at.to_string(),
                    ]
                })
                .collect();
            output::table(&["NAME", "CREATED BY", "CREATED"], &rows)
        }
        KeysCommand::Delete { name } => {
            let name = Name::new(&name).context("bad provisioner key name")?;
            client
                .call(
                    reqwest::Method::DELETE,
                    &format!("/api/v1/provisioner-keys/{name}"),
                )
                .await?;
            println!("deleted provisioner key {name}");
            Ok(())
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// URL of the coordinator.
    #[arg(long, env = "MYCO_PROVISIONER_URL")]
    url: String,
    /// Read the provisioner key from this file (else MYCO_PROVISIONER_KEY).
    #[arg(long, env = "MYCO_PROVISIONER_KEY_FILE", value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// A tag this provisioner has (repeatable): it runs builds of templates whose
    /// `[provisioner] tags` it has all of.
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    tags: Vec<String>,
    /// Builds run at once.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Where builds run and workspaces' MYCO_STATE_DIR live (default:
    /// $XDG_DATA_HOME/myco-provisioner).
    #[arg(long, env = "MYCO_PROVISIONER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    tls: crate::TlsArgs,
}

/// How often a running build's lease is renewed.
const RENEW_EVERY: Duration = Duration::from_secs(5);

pub async fn run(args: Args) -> anyhow::Result<()> {
    args.tls.apply()?;
    let key = match &args.key_file {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read the provisioner key file {}", p.display()))?
            .trim()
            .to_owned(),
        None => std::env::var("MYCO_PROVISIONER_KEY").unwrap_or_default(),
    };
    if key.is_empty() {
        bail!(
            "no provisioner key: set MYCO_PROVISIONER_KEY or pass --key-file (`myco provisioner-keys create NAME` makes one)"
        );
    }
    let mut tags = BTreeMap::new();
    for t in &args.tags {
        let (k, v) = t
            .split_once('=')
            .with_context(|| format!("bad --tag {t:?}: write KEY=VALUE"))?;
        tags.insert(k.to_owned(), v.to_owned());
    }
    let url = crate::client::normalize_url(&args.url)?;
    crate::client::check_cleartext(&url)?;
    let client = Client::new(&url, Some(key))?;
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => crate::dirs::xdg_dir(
            "XDG_DATA_HOME",
            ".local/share",
            "myco-provisioner",
            "--data-dir",
        )?,
    };
    mesh::identity::private_dir(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let instance = format!("{}-{nanos:x}", std::process::id());
    tracing::info!(url, instance, jobs = args.jobs, "provisioner running");
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.jobs.max(1) {
        let (client, tags, dir, instance) = (
            client.clone(),
            tags.clone(),
            data_dir.clone(),
            instance.clone(),
        );
        workers.spawn(async move { worker(client, tags, dir, instance).await });
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = workers.join_next() => {}
    }
    Ok(())
}

async fn worker(client: Client, tags: BTreeMap<String, String>, dir: PathBuf, instance: String) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let acquired: anyhow::Result<Option<ProvisionerJob>> = client
            .post_maybe(
                "/api/v1/provisioner/acquire",
                &AcquireJob {
                    instance: instance.clone(),
                    tags: tags.clone(),
                },
            )
            .await;
        match acquired {
            Ok(Some(job)) => {
                backoff = Duration::from_millis(500);
                run_job(&client, job, &dir, &instance).await;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(
                    "cannot ask the coordinator for builds: {}",
                    mesh::error::error_chain(e.as_ref())
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn run_job(client: &Client, job: ProvisionerJob, dir: &std::path::Path, instance: &str) {
    let base = format!(
        "/api/v1/provisioner/jobs/{}/{}",
        job.workspace_id, job.number
    );
    tracing::info!(workspace = %job.workspace_name, build = job.number, transition = job.transition.as_str(), "build started");
    let input = BuildInput {
        transition: job.transition,
        workspace_id: job.workspace_id.clone(),
        workspace_name: job.workspace_name.to_string(),
        owner: job.owner.to_string(),
        number: job.number,
        access_url: job.access_url.clone(),
        agent_tokens: job.agent_tokens.clone(),
        archive: hex::decode(&job.archive_hex).unwrap_or_default(),
        run: job.run.clone(),
        timeout: Duration::from_millis(job.timeout_ms),
        work_dir: dir
            .join("builds")
            .join(format!("{}-{}", job.workspace_id, job.number)),
        state_dir: dir.join("state").join(&job.workspace_id),
    };
    let state_dir = input.state_dir.clone();
    let (line_tx, mut line_rx) = mpsc::channel::<(mesh::Timestamp, String)>(1024);
    let (cancel_tx, cancel_rx) = watch::channel(false);
    // Both tasks are this build's: dropped (so stopped) when it returns, or earlier.
    let sender = {
        let (client, base, instance) = (client.clone(), base.clone(), instance.to_owned());
        AbortOnDropHandle::new(tokio::spawn(async move {
            let mut open = true;
            while open {
                let mut lines = Vec::new();
                match line_rx.recv().await {
                    Some(l) => lines.push(l),
                    None => open = false,
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                while lines.len() < mesh::api::JOB_LOG_BATCH_MAX {
                    match line_rx.try_recv() {
                        Ok(l) => lines.push(l),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
                if !lines.is_empty() {
                    let body = JobLogs {
                        instance: instance.clone(),
                        lines,
                    };
                    if let Err(e) = client.post_empty(&format!("{base}/logs"), &body).await {
                        tracing::warn!(
                            "cannot send build output: {}",
                            mesh::error::error_chain(e.as_ref())
                        );
                    }
                }
            }
        }))
    };
    let renewer = {
        let (client, base, instance) = (client.clone(), base.clone(), instance.to_owned());
        AbortOnDropHandle::new(tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                let renewed: anyhow::Result<Renewed> = client
                    .post(
                        &format!("{base}/renew"),
                        &JobUpdate {
                            instance: instance.clone(),
                            status: None,
                            reason: None,
                        },
                    )
                    .await;
                match renewed {
                    Ok(r) if !r.cancel => {}
                    Ok(_) => {
                        let _ = cancel_tx.send(true);
                        return;
                    }
                    Err(e) => {
                        let text = mesh::error::error_chain(e.as_ref());
                        tracing::warn!("cannot renew the build's lease: {text}");
                        // The coordinator says it is not ours any more: stop.
                        if text.contains("is not this provisioner's") {
                            let _ = cancel_tx.send(true);
                            return;
                        }
                    }
                }
            }
        }))
    };
    let outcome = provision::run(input, line_tx, cancel_rx).await;
    drop(renewer);
    let _ = sender.await;
    let (status, reason) = match outcome {
        Outcome::Succeeded => (BuildStatus::Succeeded, None),
        Outcome::Failed(why) => (BuildStatus::Failed, Some(why)),
        Outcome::Canceled => (BuildStatus::Canceled, Some("canceled".to_owned())),
    };
    tracing::info!(workspace = %job.workspace_name, build = job.number, status = ?status, "build ended");
    let body = JobUpdate {
        instance: instance.to_owned(),
        status: Some(status),
        reason,
    };
    // A deleted machine's state goes before the end is reported: whoever waits for
    // the workspace to be deleted then finds nothing of it left.
    if job.transition == Transition::Delete && status == BuildStatus::Succeeded {
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(state_dir)).await;
    }
    // The result must arrive: retried while the coordinator is unreachable, within
    // the lease (after it, the reaper has failed the build anyway).
    for attempt in 0..6 {
        match client.post_empty(&format!("{base}/finish"), &body).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(
                    attempt,
                    "cannot report how the build ended: {}",
                    mesh::error::error_chain(e.as_ref())
                );
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}
