//! `myco tokens create|ls|rm`: named API tokens of the logged-in user.

use std::time::Duration;

use anyhow::Context;
use mesh::Name;
use mesh::api::{CreateToken, CreatedToken, TokenInfo};

use crate::Globals;
use crate::client::Client;
use crate::output::{self, Format, OutputArgs};

#[derive(Debug, clap::Subcommand)]
pub enum TokensCommand {
    /// Create a token; it is printed this once and stored only as a hash.
    Create {
        /// A name for the token, unique among yours.
        name: String,
        /// How long the token lives, e.g. 12h, 30d (at most 365d).
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        lifetime: Duration,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List your tokens (never their secrets).
    #[command(visible_alias = "list")]
    Ls {
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Revoke a token: it stops working at once.
    #[command(visible_alias = "delete")]
    Rm {
        /// The token's name.
        name: String,
    },
}

pub async fn run(globals: &Globals, cmd: TokensCommand) -> anyhow::Result<()> {
    let client = Client::authenticated(globals)?;
    match cmd {
        TokensCommand::Create {
            name,
            lifetime,
            out,
        } => {
            let name = Name::new(&name).context("bad token name")?;
            let created: CreatedToken = client
                .post(
                    "/api/v1/tokens",
                    &CreateToken {
                        name,
                        lifetime_seconds: Some(lifetime.as_secs()),
                    },
                )
                .await?;
            match out.format {
                Format::Json => output::json(&created),
                Format::Table => {
                    eprintln!(
                        "token {} expires {}; it is shown only this once:",
                        created.info.name, created.info.expires_at
                    );
                    println!("{}", created.token);
                    Ok(())
                }
            }
        }
        TokensCommand::Ls { out } => {
            let tokens: Vec<TokenInfo> = client.get("/api/v1/tokens").await?;
            output::list(out.format, &tokens, &["NAME", "CREATED", "EXPIRES"], |t| {
                vec![
                    t.name.to_string(),
                    t.created_at.to_string(),
                    t.expires_at.to_string(),
                ]
            })
        }
        TokensCommand::Rm { name } => {
            let name = Name::new(&name).context("bad token name")?;
            client
                .call(reqwest::Method::DELETE, &format!("/api/v1/tokens/{name}"))
                .await?;
            println!("revoked token {name}");
            Ok(())
        }
    }
}
