//! Every route the coordinator serves, called with every kind of credential, against
//! the real binary: the expected status of each is written down here. The routes
//! come from the coordinator's own table (`coordinator::route_table`, built with the
//! router), so a route added without a row here fails this test, as does a row for
//! a route that is gone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use serde_json::json;
use tests::TestEnv;

/// The credentials, in the order of a row's statuses.
const KINDS: [&str; 8] = [
    "none",
    "malformed",
    "expired",
    "revoked",
    "other",
    "agent",
    "user",
    "admin",
];

/// One row: the route, a body to send (checked only after authentication), and the
/// status for each of [`KINDS`]. Rows run in this order; those that change state
/// come late, and their later columns expect what the earlier ones did.
struct Row {
    method: &'static str,
    path: &'static str,
    body: Option<serde_json::Value>,
    want: [u16; 8],
}

fn row(method: &'static str, path: &'static str, want: [u16; 8]) -> Row {
    Row {
        method,
        path,
        body: None,
        want,
    }
}

fn row_with(
    method: &'static str,
    path: &'static str,
    body: serde_json::Value,
    want: [u16; 8],
) -> Row {
    Row {
        method,
        path,
        body: Some(body),
        want,
    }
}

fn rows() -> Vec<Row> {
    // Public: the same answer whatever the caller sends.
    let public_ok = [200; 8];
    // A user's own things: the three bad tokens and an agent token get 401.
    vec![
        row("GET", "/healthz", public_ok),
        row("GET", "/api/v1/buildinfo", public_ok),
        row("GET", "/api/v1/users/first", public_ok),
        row_with(
            "POST",
            "/api/v1/users/first",
            json!({"username": "mallory", "password": "a-long-enough-password"}),
            [409; 8],
        ),
        row_with(
            "POST",
            "/api/v1/users/login",
            json!({"username": "alice", "password": "not-her-password"}),
            [401; 8],
        ),
        // The relay authenticates clients by their endpoint key in its handshake,
        // not by a bearer token: a plain GET is not a relay handshake.
        row("GET", "/relay", [400; 8]),
        // The agent binary and the init script a workspace image runs: public (the
        // token comes from the workspace's environment). Placeholders stand for an
        // architecture this coordinator does not serve.
        row("GET", "/bin/{file}", [404; 8]),
        row("GET", "/api/v1/init-script/linux/{arch}", [404; 8]),
        // The relay's probe, which netcheck times: public.
        row("GET", "/ping", public_ok),
        // Admins only.
        row("GET", "/metrics", [401, 401, 401, 401, 403, 401, 403, 200]),
        row(
            "GET",
            "/api/v1/debug/relay",
            [401, 401, 401, 401, 403, 401, 403, 200],
        ),
        row(
            "GET",
            "/api/v1/users",
            [401, 401, 401, 401, 403, 401, 403, 200],
        ),
        row_with(
            "POST",
            "/api/v1/users",
            json!({"username": "dave", "password": "a-long-enough-password"}),
            [401, 401, 401, 401, 403, 401, 403, 201],
        ),
        // Any user, about themselves.
        row(
            "GET",
            "/api/v1/users/me",
            [401, 401, 401, 401, 200, 401, 200, 200],
        ),
        // What netcheck probes (the relay URL, the QAD ports and certificate), so
        // it can run before a login: public, and nothing in it is secret.
        row("GET", "/api/v1/netcheck", public_ok),
        row(
            "GET",
            "/api/v1/tokens",
            [401, 401, 401, 401, 200, 401, 200, 200],
        ),
        row_with(
            "POST",
            "/api/v1/tokens",
            json!({"name": "matrix"}),
            [401, 401, 401, 401, 201, 401, 201, 201],
        ),
        row(
            "DELETE",
            "/api/v1/tokens/{name}",
            [401, 401, 401, 401, 404, 401, 404, 404],
        ),
        row(
            "GET",
            "/api/v1/workspaces",
            [401, 401, 401, 401, 200, 401, 200, 200],
        ),
        row_with(
            "POST",
            "/api/v1/workspaces",
            json!({"name": "matrix", "agents": [{"name": "main"}]}),
            [401, 401, 401, 401, 201, 401, 201, 201],
        ),
        // Alice's workspace: bob is told it does not exist, admins see it.
        row(
            "GET",
            "/api/v1/workspaces/{owner}/{name}",
            [401, 401, 401, 401, 404, 401, 200, 200],
        ),
        row(
            "GET",
            "/api/v1/workspaces/{owner}/{name}/agents/{agent}/logs",
            [401, 401, 401, 401, 404, 401, 200, 200],
        ),
        row_with(
            "POST",
            "/api/v1/workspaces/{owner}/{name}/connect",
            json!({"client_id": "0000000000000000000000000000000000000000000000000000000000000000"}),
            [401, 401, 401, 401, 404, 401, 409, 409],
        ),
        // The agent's channel: only an agent token, and then only as a WebSocket.
        row(
            "GET",
            "/api/v1/agent/control",
            [401, 401, 401, 401, 401, 400, 401, 401],
        ),
        // Another user's account: admins only; users about themselves via `me`.
        row(
            "POST",
            "/api/v1/users/{name}/revoke",
            [401, 401, 401, 401, 403, 401, 403, 200],
        ),
        row_with(
            "PUT",
            "/api/v1/users/{name}/password",
            json!({"password": "carols-new-password"}),
            [401, 401, 401, 401, 403, 401, 403, 200],
        ),
        row(
            "POST",
            "/api/v1/users/{name}/disable",
            [401, 401, 401, 401, 403, 401, 403, 200],
        ),
        row(
            "POST",
            "/api/v1/users/{name}/enable",
            [401, 401, 401, 401, 403, 401, 403, 200],
        ),
        row(
            "DELETE",
            "/api/v1/users/{name}",
            [401, 401, 401, 401, 403, 401, 403, 204],
        ),
        // Logging out needs a login session; these are API tokens.
        row(
            "POST",
            "/api/v1/users/logout",
            [401, 401, 401, 401, 400, 401, 400, 400],
        ),
        // Builds: alice's workspace was made without a template, so it has none
        // and cannot have one.
        row_with(
            "POST",
            "/api/v1/workspaces/{owner}/{name}/builds",
            json!({"transition": "start"}),
            [401, 401, 401, 401, 404, 401, 409, 409],
        ),
        row(
            "GET",
            "/api/v1/workspaces/{owner}/{name}/builds",
            [401, 401, 401, 401, 404, 401, 200, 200],
        ),
        row(
            "GET",
            "/api/v1/workspaces/{owner}/{name}/builds/{number}/logs",
            [401, 401, 401, 401, 404, 401, 404, 404],
        ),
        row(
            "POST",
            "/api/v1/workspaces/{owner}/{name}/builds/{number}/cancel",
            [401, 401, 401, 401, 404, 401, 404, 404],
        ),
        row_with(
            "PUT",
            "/api/v1/workspaces/{owner}/{name}/schedule",
            json!({"ttl": "1h"}),
            [401, 401, 401, 401, 404, 401, 409, 409],
        ),
        // Provisioner keys: admins only (an empty name is no name).
        row_with(
            "POST",
            "/api/v1/provisioner-keys",
            json!({"name": "matrix"}),
            [401, 401, 401, 401, 403, 401, 403, 201],
        ),
        row(
            "GET",
            "/api/v1/provisioner-keys",
            [401, 401, 401, 401, 403, 401, 403, 200],
        ),
        row(
            "DELETE",
            "/api/v1/provisioner-keys/{name}",
            [401, 401, 401, 401, 403, 401, 403, 404],
        ),
        // The provisioner's own routes take only a provisioner key.
        row_with(
            "POST",
            "/api/v1/provisioner/acquire",
            json!({"instance": "x", "tags": {}}),
            [401, 401, 401, 401, 401, 401, 401, 401],
        ),
        row_with(
            "POST",
            "/api/v1/provisioner/jobs/{workspace}/{number}/logs",
            json!({"instance": "x", "lines": []}),
            [401, 401, 401, 401, 401, 401, 401, 401],
        ),
        row_with(
            "POST",
            "/api/v1/provisioner/jobs/{workspace}/{number}/renew",
            json!({"instance": "x"}),
            [401, 401, 401, 401, 401, 401, 401, 401],
        ),
        row_with(
            "POST",
            "/api/v1/provisioner/jobs/{workspace}/{number}/finish",
            json!({"instance": "x", "status": "succeeded"}),
            [401, 401, 401, 401, 401, 401, 401, 401],
        ),
        // Templates: everyone logged in reads them; admins push and delete (an
        // empty body is no template).
        row(
            "GET",
            "/api/v1/templates",
            [401, 401, 401, 401, 200, 401, 200, 200],
        ),
        row(
            "GET",
            "/api/v1/templates/{name}",
            [401, 401, 401, 401, 404, 401, 404, 404],
        ),
        row(
            "PUT",
            "/api/v1/templates/{name}",
            [401, 401, 401, 401, 403, 401, 403, 400],
        ),
        row(
            "DELETE",
            "/api/v1/templates/{name}",
            [401, 401, 401, 401, 403, 401, 403, 404],
        ),
        // Last: they end the workspace. Alice rotates, then deletes; the admin
        // comes after and finds it gone.
        row(
            "POST",
            "/api/v1/workspaces/{owner}/{name}/agents/{agent}/token",
            [401, 401, 401, 401, 404, 401, 200, 200],
        ),
        row(
            "DELETE",
            "/api/v1/workspaces/{owner}/{name}",
            [401, 401, 401, 401, 404, 401, 204, 404],
        ),
    ]
}

/// Fills a route's placeholders: alice's workspace `dev` and its agent `main`; the
/// user acted on is carol, a third user; a token name that does not exist.
fn concrete(path: &str) -> String {
    let name = if path.starts_with("/api/v1/users/") {
        "carol"
    } else if path.starts_with("/api/v1/tokens/") {
        "no-such-token"
    } else {
        "dev"
    };
    path.replace("{file}", "myco-linux-sparc")
        .replace("{arch}", "sparc")
        .replace("{owner}", "alice")
        .replace("{name}", name)
        .replace("{agent}", "main")
        .replace("{number}", "1")
        .replace("{workspace}", "no-such-workspace")
}

fn api_token(env: &TestEnv, user: &str, name: &str, lifetime: &str) -> String {
    env.run(user, &["tokens", "create", name, "--lifetime", lifetime])
        .ok()
        .stdout
        .trim()
        .to_owned()
}

#[test]
fn every_route_answers_every_kind_of_caller_as_written_down() {
    // The rows cover the router's routes exactly.
    let table: Vec<(String, String)> = coordinator::route_table()
        .into_iter()
        .map(|r| (r.method.to_owned(), r.path))
        .collect();
    let rows = rows();
    let covered: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    for route in &table {
        assert!(
            covered.contains(route),
            "route {} {} has no row in the auth matrix: add one",
            route.0,
            route.1
        );
    }
    for row in &covered {
        assert!(
            table.contains(row),
            "the auth matrix has a row for {} {}, which the router does not serve",
            row.0,
            row.1
        );
    }

    let env = TestEnv::start();
    env.bootstrap("admin");
    env.add_user("admin", "alice");
    env.add_user("admin", "bob");
    env.add_user("admin", "carol");
    let agent_token = env.create_workspace("alice", "dev");
    let expired = api_token(&env, "alice", "short", "1s");
    let revoked = api_token(&env, "alice", "gone", "1h");
    env.run("alice", &["tokens", "rm", "gone"]).ok();
    let creds: [Option<String>; 8] = [
        None,
        Some("myco_this-is-not-a-token".into()),
        Some(expired.clone()),
        Some(revoked),
        Some(api_token(&env, "bob", "matrix-bob", "1h")),
        Some(agent_token),
        Some(api_token(&env, "alice", "matrix-alice", "1h")),
        Some(api_token(&env, "admin", "matrix-admin", "1h")),
    ];
    let api = env.http();
    tests::eventually("the short token expires", || {
        api.get("/api/v1/users/me", Some(&expired)).status == 401
    });

    let mut wrong = BTreeMap::new();
    for row in &rows {
        let path = concrete(row.path);
        for (i, cred) in creds.iter().enumerate() {
            let body = row
                .body
                .as_ref()
                .map(|b| ("application/json", serde_json::to_vec(b).unwrap()));
            let reply = api.request(row.method, &path, cred.as_deref(), body);
            if reply.status != row.want[i] {
                wrong.insert(
                    format!("{} {} as {}", row.method, row.path, KINDS[i]),
                    format!("{} (want {}): {}", reply.status, row.want[i], reply.body),
                );
            } else if reply.status >= 400 {
                // Every refusal is our JSON error, with a message and a detail.
                reply.error(reply.status);
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
