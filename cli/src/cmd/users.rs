//! `myco users`: create, list, disable, enable, delete (admins); passwd and revoke
//! (oneself, or anyone for an admin).

use anyhow::Context;
use mesh::Name;
use mesh::api::{ChangePassword, CreateUser, Revoked, User};
use reqwest::Method;

use crate::Globals;
use crate::client::Client;
use crate::output::{self, Format, OutputArgs};

#[derive(Debug, clap::Subcommand)]
pub enum UsersCommand {
    /// Create a user.
    Create {
        /// The new user's name: 1-32 characters of a-z, 0-9 and -.
        username: String,
        /// Make the user an admin.
        #[arg(long)]
        admin: bool,
        /// Read the new user's password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List users.
    #[command(visible_alias = "list")]
    Ls {
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Disable a user: they can no longer log in or use any token, and what their
    /// tickets opened on the mesh is closed at once. `enable` undoes it.
    Disable {
        username: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Enable a disabled user; their API tokens work again.
    Enable {
        username: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Delete a user and all their sessions and tokens. Refused while they own
    /// workspaces: delete those first, or disable the user instead.
    #[command(visible_alias = "rm")]
    Delete { username: String },
    /// Change your password, or (admins) another user's. Ends every other session of
    /// that user; API tokens stay.
    Passwd {
        /// The user; yourself when left out.
        username: Option<String>,
        /// Read the passwords from stdin instead of a terminal: for your own, the
        /// current password on the first line and the new one on the second; for
        /// another user's (admins), the new one on the first line.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Revoke every session and API token of a user (yourself when left out; admins
    /// for anyone), closing what they opened on the mesh. You are logged out too when
    /// it is you.
    Revoke { username: Option<String> },
}

pub async fn run(globals: &Globals, cmd: UsersCommand) -> anyhow::Result<()> {
    let client = Client::authenticated(globals)?;
    match cmd {
        UsersCommand::Create {
            username,
            admin,
            password_stdin,
            out,
        } => {
            let username = Name::new(&username).context("bad username")?;
            let password = super::read_password(password_stdin, true)?;
            let user: User = client
                .post(
                    "/api/v1/users",
                    &CreateUser {
                        username,
                        password,
                        admin,
                    },
                )
                .await?;
            match out.format {
                Format::Json => output::json(&user),
                Format::Table => {
                    let role = if user.admin { " (admin)" } else { "" };
                    println!("created user {}{role}", user.username);
                    Ok(())
                }
            }
        }
        UsersCommand::Ls { out } => {
            let users: Vec<User> = client.get("/api/v1/users").await?;
            output::list(
                out.format,
                &users,
                &["USERNAME", "ADMIN", "CREATED", "STATE"],
                |u| {
                    vec![
                        u.username.to_string(),
                        u.admin.to_string(),
                        u.created_at.to_string(),
                        if u.disabled { "disabled" } else { "active" }.to_owned(),
                    ]
                },
            )
        }
        UsersCommand::Disable { username, out } => {
            let user: User = client
                .request::<(), _>(Method::POST, &user_path(&username, "/disable")?, None)
                .await?;
            print_user(out.format, &user, "disabled")
        }
        UsersCommand::Enable { username, out } => {
            let user: User = client
                .request::<(), _>(Method::POST, &user_path(&username, "/enable")?, None)
                .await?;
            print_user(out.format, &user, "enabled")
        }
        UsersCommand::Delete { username } => {
            client
                .call(Method::DELETE, &user_path(&username, "")?)
                .await?;
            println!("deleted user {username}");
            Ok(())
        }
        UsersCommand::Passwd {
            username,
            password_stdin,
        } => {
            let own = username.is_none();
            let who = username.as_deref().unwrap_or("me");
            let old_password = if own {
                Some(if password_stdin {
                    super::read_password(true, false)?
                } else {
                    super::prompt_secret("Current password: ")?
                })
            } else {
                None
            };
            let password = super::read_password(password_stdin, true)?;
            let r: Revoked = client
                .request(
                    Method::PUT,
                    &user_path(who, "/password")?,
                    Some(&ChangePassword {
                        password,
                        old_password,
                    }),
                )
                .await?;
            println!(
                "password changed for {}; {} other session(s) ended",
                username.as_deref().unwrap_or("you"),
                r.tokens
            );
            Ok(())
        }
        UsersCommand::Revoke { username } => {
            let who = username.as_deref().unwrap_or("me");
            let r: Revoked = client
                .request::<(), _>(Method::POST, &user_path(who, "/revoke")?, None)
                .await?;
            println!(
                "revoked {} session(s) and token(s) of {}",
                r.tokens,
                username.as_deref().unwrap_or("you")
            );
            Ok(())
        }
    }
}

/// `/api/v1/users/NAME{suffix}`, with the name checked first (`me` is the caller).
fn user_path(username: &str, suffix: &str) -> anyhow::Result<String> {
    if username != "me" {
        Name::new(username).context("bad username")?;
    }
    Ok(format!("/api/v1/users/{username}{suffix}"))
}

fn print_user(format: Format, user: &User, done: &str) -> anyhow::Result<()> {
    match format {
        Format::Json => output::json(user),
        Format::Table => {
            println!("{done} user {}", user.username);
            Ok(())
        }
    }
}
