//! One module per group of `myco` commands.

pub mod agent;
pub mod lifecycle;
pub mod login;
pub mod netcheck;
pub mod ping;
pub mod port_forward;
#[cfg(feature = "server")]
pub mod provisioner;
#[cfg(feature = "server")]
pub mod scaletest;
#[cfg(feature = "server")]
pub mod server;
pub mod speedtest;
pub mod ssh;
pub mod tokens;
pub mod users;
pub mod workspaces;

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, bail};

/// Reads a password: the first line of stdin with `--password-stdin`, else a hidden
/// prompt on a terminal (twice when `confirm`), else an error saying what to pass.
pub fn read_password(from_stdin: bool, confirm: bool) -> anyhow::Result<String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from stdin")?;
        let pw = line.trim_end_matches(['\n', '\r']).to_owned();
        if pw.is_empty() {
            bail!(
                "--password-stdin got an empty password; pipe it in, e.g. `echo \"$PW\" | myco ...`"
            );
        }
        return Ok(pw);
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "no password given and stdin is not a terminal; pass --password-stdin and pipe it in"
        );
    }
    let pw = rpassword::prompt_password("Password: ").context("cannot read the password")?;
    if confirm {
        let again =
            rpassword::prompt_password("Confirm password: ").context("cannot read the password")?;
        if again != pw {
            bail!("the passwords do not match; try again");
        }
    }
    Ok(pw)
}

/// Asks for a secret on a terminal without echo, or says to pipe it in when there is none.
pub fn prompt_secret(prompt: &str) -> anyhow::Result<String> {
    if !std::io::stdin().is_terminal() {
        bail!("stdin is not a terminal; pass --password-stdin and pipe the passwords in");
    }
    rpassword::prompt_password(prompt).context("cannot read the password")
}

/// Asks for a line of text on a terminal, or says which flag to pass when there is none.
pub fn prompt_line(prompt: &str, flag: &str) -> anyhow::Result<String> {
    if !std::io::stdin().is_terminal() {
        bail!("stdin is not a terminal; pass {flag}");
    }
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim().to_owned())
}
