//! A small client of the coordinator's HTTP API that turns every failure into an
//! error saying what went wrong and what to do.

use anyhow::{Context, bail};
use mesh::api::ErrorBody;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Globals;
use crate::session;

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// Whether `--insecure-http` allows sending secrets over plain HTTP beyond loopback.
static INSECURE_HTTP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set once from the global `--insecure-http`.
pub fn allow_insecure_http(allow: bool) {
    INSECURE_HTTP.store(allow, std::sync::atomic::Ordering::Relaxed);
}

/// Refuses to send a password or token to `url` in clear text unless it stays on
/// this machine (loopback) or the user opted in with `--insecure-http`, in which
/// case it warns once.
pub fn check_cleartext(url: &str) -> anyhow::Result<()> {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return Ok(());
    };
    if parsed.scheme() != "http" {
        return Ok(());
    }
    let host = parsed.host_str().unwrap_or("").trim_matches(['[', ']']);
    let local = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if local {
        return Ok(());
    }
    if !INSECURE_HTTP.load(std::sync::atomic::Ordering::Relaxed) {
        bail!(
            "{url} is plain HTTP to another machine: a password or token would cross the network in clear; use https:// (`myco server --tls-cert-file`), or pass --insecure-http to send it anyway"
        );
    }
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        eprintln!("myco: warning: sending credentials in clear text to {url} (--insecure-http)");
    });
    Ok(())
}

/// Normalizes a coordinator URL given by the user: requires http(s), drops a trailing `/`.
pub fn normalize_url(url: &str) -> anyhow::Result<String> {
    let url = url.trim().trim_end_matches('/');
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        bail!("{url:?} is not a coordinator URL; write it like http://127.0.0.1:3000");
    };
    if rest.is_empty() {
        bail!("{url:?} has no host; write it like http://127.0.0.1:3000");
    }
    Ok(url.to_owned())
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*trust::get().client_config()).clone())
            .user_agent(concat!("myco/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            http,
            base: normalize_url(base)?,
            token,
        })
    }

    /// A client for the coordinator and identity the user chose: `--url`/`--token`
    /// override the saved session.
    pub fn authenticated(globals: &Globals) -> anyhow::Result<Self> {
        let saved = session::load(&session::config_dir(globals)?)?;
        let url = match (&globals.url, &saved) {
            (Some(u), _) => normalize_url(u)?,
            (None, Some(s)) => s.url.clone(),
            (None, None) => bail!("you are not logged in; run `myco login URL` first"),
        };
        let token = match (&globals.token, &saved) {
            (Some(t), _) => t.clone(),
            (None, Some(s)) if s.url == url => s.token.clone(),
            (None, Some(s)) => bail!(
                "your session is for {} but --url names {url}; run `myco login {url}` or pass --token",
                s.url
            ),
            (None, None) => bail!("no API token for {url}; run `myco login {url}` or pass --token"),
        };
        Self::new(&url, Some(token))
    }

    /// A client for the coordinator the user chose (`--url`, else the saved session's),
    /// for public endpoints: no token is needed, and none is sent.
    pub fn public(globals: &Globals) -> anyhow::Result<Self> {
        let url = match &globals.url {
            Some(u) => normalize_url(u)?,
            None => match session::load(&session::config_dir(globals)?)? {
                Some(s) => s.url,
                None => bail!("no coordinator given; pass --url URL or run `myco login URL` first"),
            },
        };
        Self::new(&url, None)
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The API token requests carry, for the rare call that is not JSON (`/metrics`).
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<reqwest::Response> {
        self.send_as(method, path, body, "application/json").await
    }

    async fn send_as(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        content_type: &'static str,
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(t) = &self.token {
            check_cleartext(&self.base)?;
            req = req.bearer_auth(t);
        } else if body.is_some() {
            // Login, first user: the body holds a password.
            check_cleartext(&self.base)?;
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(b);
        }
        let resp = req.send().await.map_err(|e| {
            let host = reqwest::Url::parse(&self.base)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_default();
            if let Some(line) = trust::explain(&host, &e) {
                return anyhow::anyhow!("cannot reach the coordinator at {}: {line}", self.base);
            }
            let why = if e.is_connect() {
                "is `myco server` running there?"
            } else if e.is_timeout() {
                "it did not answer in time"
            } else {
                "check the URL"
            };
            anyhow::anyhow!(
                "cannot reach the coordinator at {}: {why} ({})",
                self.base,
                mesh::error::root_cause(&e)
            )
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(api_error(resp).await)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        decode(self.send(Method::GET, path, None).await?).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let bytes = serde_json::to_vec(body).context("cannot encode the request")?;
        decode(self.send(Method::POST, path, Some(bytes)).await?).await
    }

    /// `method` with an optional JSON body, decoding a JSON answer.
    pub async fn request<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let bytes = body
            .map(serde_json::to_vec)
            .transpose()
            .context("cannot encode the request")?;
        decode(self.send(method, path, bytes).await?).await
    }

    /// PUT of a tar archive (a template), decoding a JSON answer.
    pub async fn put_archive<T: DeserializeOwned>(
        &self,
        path: &str,
        archive: Vec<u8>,
    ) -> anyhow::Result<T> {
        decode(
            self.send_as(Method::PUT, path, Some(archive), "application/x-tar")
                .await?,
        )
        .await
    }

    /// POST with a JSON body whose answer may be JSON (`Some`) or empty (`204`).
    #[cfg(feature = "server")]
    pub async fn post_maybe<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<Option<T>> {
        let bytes = serde_json::to_vec(body).context("cannot encode the request")?;
        let resp = self.send(Method::POST, path, Some(bytes)).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        decode(resp).await.map(Some)
    }

    /// POST with a JSON body whose answer is empty.
    #[cfg(feature = "server")]
    pub async fn post_empty<B: Serialize>(&self, path: &str, body: &B) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(body).context("cannot encode the request")?;
        self.send(Method::POST, path, Some(bytes)).await?;
        Ok(())
    }

    /// `method` whose answer may have a JSON body (`Some`) or none (`204`).
    pub async fn call_maybe<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> anyhow::Result<Option<T>> {
        let resp = self.send(method, path, None).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        decode(resp).await.map(Some)
    }

    /// POST or DELETE whose answer has no body.
    pub async fn call(&self, method: Method, path: &str) -> anyhow::Result<()> {
        self.send(method, path, None).await?;
        Ok(())
    }
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> anyhow::Result<T> {
    let bytes = resp
        .bytes()
        .await
        .context("the coordinator's answer broke off")?;
    serde_json::from_slice(&bytes).context(
        "the coordinator's answer is not what this myco expects; are both the same version?",
    )
}

/// An error answer from the API: its message and detail when it sent JSON, else the status.
async fn api_error(resp: reqwest::Response) -> anyhow::Error {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) if body.detail.is_empty() => anyhow::anyhow!("{}", body.message),
        Ok(body) => anyhow::anyhow!("{}: {}", body.message, body.detail),
        Err(_) if status == StatusCode::NOT_FOUND => {
            anyhow::anyhow!("the coordinator answered 404; is this URL a myco coordinator?")
        }
        Err(_) => anyhow::anyhow!("the coordinator answered {status}"),
    }
}
