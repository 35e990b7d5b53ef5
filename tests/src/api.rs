//! A raw client of the coordinator's HTTP API, for what the CLI does not say (status
//! codes, error bodies, routes no command calls).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// A raw client of the coordinator's API.
pub struct Api {
    pub base: String,
    pub client: reqwest::blocking::Client,
}

/// A status and a parsed JSON body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Reply {
    /// Asserts an error reply of `status` in our JSON shape; returns the message.
    #[track_caller]
    pub fn error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{self:#?}");
        let message = self.body["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message: {self:#?}"));
        assert!(!message.is_empty(), "{self:#?}");
        assert!(self.body["detail"].is_string(), "no detail: {self:#?}");
        message.to_owned()
    }
}

impl Api {
    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some((content_type, bytes)) = body {
            req = req.header("content-type", content_type).body(bytes);
        }
        let resp = req.send().unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().unwrap();
        let body = if text.is_empty() {
            serde_json::Value::Null
        } else {
            // Not JSON (a metrics page, a relay's plain answer): the text, which
            // `Reply::error` then refuses as an error body.
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        };
        Reply { status, body }
    }

    pub fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.request("GET", path, token, None)
    }

    pub fn post_json(&self, path: &str, token: Option<&str>, body: &serde_json::Value) -> Reply {
        self.request(
            "POST",
            path,
            token,
            Some(("application/json", serde_json::to_vec(body).unwrap())),
        )
    }

    pub fn delete(&self, path: &str, token: Option<&str>) -> Reply {
        self.request("DELETE", path, token, None)
    }
}
