//! The bundled demo upstream (`--demo`): a tiny app that uses nothing but
//! the session protocol, to show the gateway working with curl.
//!
//! - `GET /` counts visits: reads `X-Session`, answers `X-Session-Patch`.
//! - `GET /login?user=NAME` stores the user and regenerates the id.
//! - `GET /logout` destroys the session.

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Map, Value};

pub struct DemoApp {
    pub header: String,
}

#[async_trait]
impl ServeHttp for DemoApp {
    async fn response(&self, http: &mut ServerSession) -> Response<Vec<u8>> {
        let req = http.req_header();
        let session: Map<String, Value> = req
            .headers
            .get(self.header.as_str())
            .and_then(|v| serde_json::from_slice(v.as_bytes()).ok())
            .unwrap_or_default();
        let path = req.uri.path().to_string();
        let query = req.uri.query().unwrap_or("").to_string();
        let patch = format!("{}-Patch", self.header);
        let action = format!("{}-Action", self.header);
        let user = session
            .get("user")
            .and_then(Value::as_str)
            .map(str::to_string);
        let builder = Response::builder().header("Content-Type", "text/plain; charset=utf-8");
        let (builder, body) = match path.as_str() {
            "/login" => {
                let name = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("user="))
                    .filter(|n| {
                        !n.is_empty()
                            && n.len() <= 64
                            && n.bytes().all(|b| b.is_ascii_alphanumeric())
                    })
                    .unwrap_or("guest");
                (
                    builder
                        .header(patch.as_str(), json!({ "user": name }).to_string())
                        .header(action.as_str(), "regenerate"),
                    format!("Logged in as {name} (session id regenerated).\n"),
                )
            }
            "/logout" => (
                builder.header(action.as_str(), "destroy"),
                "Logged out (session destroyed).\n".to_string(),
            ),
            _ => {
                let visits = session.get("visits").and_then(Value::as_u64).unwrap_or(0) + 1;
                let greeting = user.map_or("Hello".to_string(), |u| format!("Hello {u}"));
                (
                    builder.header(patch.as_str(), json!({ "visits": visits }).to_string()),
                    format!(
                        "{greeting}! You have visited {visits} time(s).\nThe gateway sent this app {}: {}\n",
                        self.header,
                        Value::Object(session)
                    ),
                )
            }
        };
        let body = body.into_bytes();
        builder
            .header("Content-Length", body.len())
            .body(body)
            .expect("static response parts are valid")
    }
}
