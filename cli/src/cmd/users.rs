//! `myco users create|ls` (admins only).

use anyhow::Context;
use mesh::Name;
use mesh::api::{CreateUser, User};

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
            output::list(out.format, &users, &["USERNAME", "ADMIN", "CREATED"], |u| {
                vec![
                    u.username.to_string(),
                    u.admin.to_string(),
                    u.created_at.to_string(),
                ]
            })
        }
    }
}
