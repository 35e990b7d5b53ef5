//! Behind a TLS-terminating reverse proxy, against the real binaries and Debian's
//! nginx and Caddy: the coordinator listens on loopback in plain HTTP, the proxy
//! serves `https://` in front with the configuration README gives, and login, create, the
//! agent's control channel and the relay (WebSocket upgrades), a Prometheus scrape
//! and OpenSSH through `config-ssh` all go through it. Rate limits see the client's
//! address through the proxy, and only from a trusted one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Child, Command, Stdio};

use tests::{TestEnv, free_port};

/// The proxy in the foreground with its own dir; killed when dropped.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The server block README gives, for `port` in front of `upstream`.
fn nginx_conf(dir: &Path, port: u16, upstream: &str, cert: &Path, key: &Path) -> String {
    let d = dir.display();
    // Running as root, the workers would drop to `nobody`, who cannot read the
    // temp dir; they stay root here.
    let user = if nix_is_root() { "user root;" } else { "" };
    format!(
        r#"{user}
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};

        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_buffering off;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"#,
        cert = cert.display(),
        key = key.display(),
    )
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The site block README gives, for `port` in front of `upstream`, with global
/// options that keep Caddy to its dir: no admin API, no port 80 redirect, no
/// attempt at a certificate of its own.
fn caddy_conf(dir: &Path, port: u16, upstream: &str, cert: &Path, key: &Path) -> String {
    format!(
        r#"{{
    admin off
    auto_https disable_redirects
    http_port {http}
    storage file_system {{
        root {d}/caddy
    }}
}}
https://127.0.0.1:{port} {{
    tls {cert} {key}
    reverse_proxy {upstream}
}}
"#,
        http = free_port(),
        d = dir.display(),
        cert = cert.display(),
        key = key.display(),
    )
}

/// Debian's nginx or Caddy, with `conf` in `dir`, once it listens on `port`; `None`
/// (a skip, said why) where it is not installed, outside CI.
fn start_proxy(kind: &str, dir: &Path, conf: &str, port: u16) -> Option<Proxy> {
    if Command::new(kind).arg("-v").output().is_err()
        && Command::new(kind).arg("version").output().is_err()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{kind} must be installed under CI (bash .ci/test installs it)"
        );
        eprintln!("skipping: needs {kind} (Debian package nginx-light or caddy)");
        return None;
    }
    let path = dir.join(format!("{kind}.conf"));
    std::fs::write(&path, conf).unwrap();
    let mut cmd = Command::new(kind);
    match kind {
        "nginx" => cmd.arg("-p").arg(dir).arg("-c").arg(&path),
        _ => cmd
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&path)
            .env("HOME", dir)
            .env("XDG_DATA_HOME", dir)
            .env("XDG_CONFIG_HOME", dir),
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{kind}.log"))).unwrap())
        .spawn()
        .unwrap();
    let proxy = Proxy(child);
    tests::eventually(&format!("{kind} listens"), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    Some(proxy)
}

#[test]
fn everything_works_through_nginx_terminating_tls() {
    everything_works_through("nginx");
}

#[test]
fn everything_works_through_caddy_terminating_tls() {
    everything_works_through("caddy");
}

fn everything_works_through(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tests::pki::private_ca(dir.path(), "proxy", &["127.0.0.1", "localhost"]);
    let port = free_port();
    let public = format!("https://127.0.0.1:{port}");
    let mut env = TestEnv::start_with(&[
        "--access-url",
        &public,
        "--trusted-proxies",
        "127.0.0.1",
        "--login-rate-per-ip",
        "3",
    ]);
    let upstream = env.url.trim_start_matches("http://").to_owned();
    let conf = match kind {
        "nginx" => nginx_conf(dir.path(), port, &upstream, &cert, &key),
        _ => caddy_conf(dir.path(), port, &upstream, &cert, &key),
    };
    let Some(_proxy) = start_proxy(kind, dir.path(), &conf, port) else {
        return;
    };
    // Every client goes through the proxy from here on.
    env.url = public.clone();
    env.client_env
        .push(("MYCO_CA_CERT_FILE".into(), ca.to_str().unwrap().to_owned()));
    env.bootstrap("alice");
    let token = env.create_workspace("alice", "dev");
    let _agent = env.start_agent(&token);
    let shown = env.wait_agent_connected("alice", "dev");
    assert_eq!(
        shown["connection"]["relay_url"].as_str().unwrap(),
        format!("{public}/")
    );
    let out = env
        .run("alice", &["ping", "dev", "-n", "2", "--relay-only"])
        .ok();
    assert!(
        out.stdout.contains(&format!("relay {public}")),
        "{}",
        out.stdout
    );

    // OpenSSH through config-ssh.
    let cfg = env.config_ssh("alice");
    let ssh = env
        .openssh(&cfg)
        .args(["myco.dev", "echo", "through-the-proxy"])
        .output()
        .unwrap();
    assert!(ssh.status.success(), "{ssh:?}");
    assert_eq!(
        String::from_utf8_lossy(&ssh.stdout).trim(),
        "through-the-proxy"
    );

    // A real Prometheus scrapes /metrics through the proxy, with an admin's token.
    let admin_token = env.token_of("alice");
    let prom_port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: myco\n    scheme: https\n    tls_config:\n      ca_file: {}\n    authorization:\n      credentials: {admin_token}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n",
            ca.display()
        ),
    )
    .unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus is installed (.ci/test installs Debian's package)");
    let client = reqwest::blocking::Client::new();
    tests::eventually(
        "Prometheus scrapes the coordinator through the proxy",
        || {
            client
                .get(format!("http://127.0.0.1:{prom_port}/api/v1/query"))
                .query(&[("query", "myco_agents_up")])
                .send()
                .ok()
                .and_then(|r| r.json::<serde_json::Value>().ok())
                .and_then(|v| v["data"]["result"].as_array().cloned())
                .is_some_and(|r| r.iter().any(|s| s["value"][1] == "1"))
        },
    );
    let _ = prom.kill();
    let _ = prom.wait();

    // Login rate limits count the client's address, not the proxy's: one address
    // spends its budget (and cannot shift the blame by writing X-Forwarded-For)...
    let from = |src: &str| {
        let mut builder = reqwest::blocking::Client::builder()
            .local_address(src.parse::<std::net::IpAddr>().unwrap());
        for c in reqwest::Certificate::from_pem_bundle(&std::fs::read(&ca).unwrap()).unwrap() {
            builder = builder.add_root_certificate(c);
        }
        builder.build().unwrap()
    };
    let attempt = |client: &reqwest::blocking::Client, spoof: &str| {
        client
            .post(format!("{public}/api/v1/users/login"))
            .header("X-Forwarded-For", spoof)
            .json(&serde_json::json!({"username": "nobody", "password": "guess-guess"}))
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    let mallory = from("127.0.0.5");
    let statuses: Vec<u16> = (0..5)
        .map(|n| attempt(&mallory, &format!("10.0.0.{n}")))
        .collect();
    assert_eq!(statuses, [401, 401, 401, 429, 429]);
    // ...while another client behind the same proxy is not affected.
    assert_eq!(attempt(&from("127.0.0.6"), "10.0.0.1"), 401);
}
