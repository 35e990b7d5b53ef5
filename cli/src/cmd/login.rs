//! `myco login`, `myco logout`, `myco whoami`.

use anyhow::{Context, bail};
use mesh::Name;
use mesh::api::{Credentials, FirstUserStatus, Session, User};

use crate::Globals;
use crate::client::{Client, normalize_url};
use crate::output::{self, Format, OutputArgs};
use crate::session::{self, SavedSession};

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// URL of the coordinator, e.g. http://127.0.0.1:3000.
    url: String,
    /// Your username (prompted for when interactive).
    #[arg(long)]
    username: Option<String>,
    /// Read the password from the first line of stdin.
    #[arg(long)]
    password_stdin: bool,
    /// Create the first user, an admin, on a coordinator that has none yet.
    #[arg(long)]
    first_user: bool,
    /// With --first-user: the one-time setup code `myco server` printed at start,
    /// which it asks for when it listens beyond loopback (also MYCO_SETUP_CODE).
    #[arg(
        long,
        env = "MYCO_SETUP_CODE",
        hide_env_values = true,
        requires = "first_user"
    )]
    setup_code: Option<String>,
}

pub async fn login(globals: &Globals, args: LoginArgs) -> anyhow::Result<()> {
    let url = normalize_url(&args.url)?;
    let client = Client::new(&url, None)?;
    let first: FirstUserStatus = client.get("/api/v1/users/first").await?;
    if args.first_user && first.exists {
        bail!("{url} already has users; log in without --first-user");
    }
    if !args.first_user && !first.exists {
        bail!(
            "{url} has no users yet; create the first (admin) user with `myco login {url} --first-user`"
        );
    }
    if args.first_user && first.setup_code_required && args.setup_code.is_none() {
        bail!(
            "{url} asks for the setup code it printed at start; pass --setup-code CODE (or MYCO_SETUP_CODE)"
        );
    }
    let username = match args.username {
        Some(u) => u,
        None => super::prompt_line("Username: ", "--username")?,
    };
    let username = Name::new(&username).context("bad username")?;
    let password = super::read_password(args.password_stdin, args.first_user)?;
    let creds = Credentials {
        username,
        password,
        setup_code: args.setup_code.filter(|_| args.first_user),
    };
    let session: Session = if args.first_user {
        client.post("/api/v1/users/first", &creds).await?
    } else {
        client.post("/api/v1/users/login", &creds).await?
    };
    let dir = session::config_dir(globals)?;
    session::save(
        &dir,
        &SavedSession {
            url: url.clone(),
            username: session.user.username.to_string(),
            token: session.token,
        },
    )?;
    let role = if session.user.admin { " (admin)" } else { "" };
    if args.first_user {
        println!(
            "created the first user {}{role} on {url}",
            session.user.username
        );
    }
    println!(
        "logged in to {url} as {}{role}; session valid until {}",
        session.user.username, session.expires_at
    );
    Ok(())
}

pub async fn logout(globals: &Globals) -> anyhow::Result<()> {
    let dir = session::config_dir(globals)?;
    let Some(saved) = session::load(&dir)? else {
        println!("not logged in");
        return Ok(());
    };
    let client = Client::new(&saved.url, Some(saved.token.clone()))?;
    // The session file goes whether or not the coordinator can be told: a user who
    // logs out must not stay logged in locally because the server is down.
    let revoked = client
        .call(reqwest::Method::POST, "/api/v1/users/logout")
        .await;
    session::remove(&dir)?;
    match revoked {
        Ok(()) => println!("logged out of {}", saved.url),
        Err(e) => {
            println!("removed the local session for {}", saved.url);
            eprintln!(
                "myco: warning: the coordinator could not revoke it: {}",
                mesh::error::error_chain(e.as_ref())
            );
        }
    }
    Ok(())
}

pub async fn whoami(globals: &Globals, out: OutputArgs) -> anyhow::Result<()> {
    let client = Client::authenticated(globals)?;
    let me: User = client.get("/api/v1/users/me").await?;
    match out.format {
        Format::Json => output::json(&me),
        Format::Table => {
            let role = if me.admin { " (admin)" } else { "" };
            println!("{}{role} on {}", me.username, client.base_url());
            Ok(())
        }
    }
}
