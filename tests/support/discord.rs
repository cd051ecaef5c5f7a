//! A small fake Discord on 127.0.0.1 that the real serenity client talks to:
//! - REST under `/api/v10` (serenity's `HttpBuilder::proxy` sends requests here): records
//!   every request (JSON body, or multipart `payload_json` + files) and answers like Discord;
//! - the gateway (`ws://`, its URL from `GET /api/v10/gateway`): HELLO, IDENTIFY -> READY,
//!   heartbeat ACKs, then the events a test injects;
//! - a CDN under `/cdn/` serving the files a test hosts (attachment URLs point here).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::to_bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub const APP_ID: u64 = 100;
pub const BOT_ID: u64 = 101;
pub const GUILD_ID: u64 = 300;
pub const CHANNEL_ID: u64 = 400;
pub const DM_CHANNEL_ID: u64 = 401;
pub const TIMESTAMP: &str = "2025-01-01T00:00:00.000000+00:00";

/// Permissions as Discord sends them (decimal strings).
pub const PERM_ALL_TEXT: u64 = (1 << 10) | (1 << 11) | (1 << 15); // view, send, attach
pub const PERM_CREATE_EXPRESSIONS: u64 = 1 << 43;
pub const PERM_MANAGE_GUILD: u64 = 1 << 5;

/// A file part of a multipart request.
#[derive(Debug, Clone)]
pub struct Part {
    pub field: String,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub bytes: Vec<u8>,
}

/// One request the bot made.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path without the `/api/v10` prefix, e.g. `/webhooks/100/tok/messages/@original`.
    pub path: String,
    pub query: String,
    /// The JSON body, or the multipart `payload_json`.
    pub json: Option<Value>,
    /// Multipart text fields other than `payload_json` (e.g. a sticker's name).
    pub fields: HashMap<String, String>,
    pub files: Vec<Part>,
    pub authorization: Option<String>,
    pub at: Instant,
}

impl Recorded {
    pub fn is(&self, method: &str, path: &str) -> bool {
        self.method == method && self.path == path
    }

    /// The message flags of an interaction callback, follow-up or edit.
    pub fn flags(&self) -> u64 {
        let j = self.json.as_ref();
        j.and_then(|j| j.pointer("/data/flags").or_else(|| j.get("flags")))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// The message content of an interaction callback, follow-up or edit.
    pub fn content(&self) -> String {
        let j = self.json.as_ref();
        j.and_then(|j| j.pointer("/data/content").or_else(|| j.get("content")))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    }

    /// The interaction callback type (4 message, 5 deferred, 8 autocomplete).
    pub fn callback_type(&self) -> Option<u64> {
        self.json
            .as_ref()
            .and_then(|j| j.get("type"))
            .and_then(Value::as_u64)
    }
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<Recorded>>,
    cdn: Mutex<HashMap<String, (String, Vec<u8>)>>,
    /// CDN paths answered with a redirect to the URL they map to.
    redirects: Mutex<HashMap<String, String>>,
    /// Sender of the newest gateway connection's event queue.
    gateway: Mutex<Option<mpsc::UnboundedSender<Value>>>,
    /// (status, body) to answer the next sticker uploads with, instead of success.
    sticker_reply: Mutex<Option<(u16, Value)>>,
    ids: AtomicU64,
    ws_url: Mutex<String>,
    /// IDENTIFY payloads received.
    identifies: Mutex<Vec<Value>>,
}

pub struct FakeDiscord {
    /// `http://127.0.0.1:PORT`: the REST proxy URL and the CDN base.
    pub base: String,
    shared: Arc<Shared>,
    /// Bumped on every recorded request.
    changed: watch::Sender<u64>,
    /// Number of READY events sent.
    readies: watch::Sender<u64>,
}

impl FakeDiscord {
    pub async fn start() -> Arc<Self> {
        let shared = Arc::new(Shared {
            ids: AtomicU64::new(10_000),
            ..Shared::default()
        });
        let (changed, _) = watch::channel(0u64);
        let (readies, _) = watch::channel(0u64);

        let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
        *shared.ws_url.lock().unwrap() = format!("ws://{}", ws.local_addr().unwrap());
        let rest = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", rest.local_addr().unwrap());
        let fake = Arc::new(Self {
            base,
            shared,
            changed,
            readies,
        });

        let f = Arc::clone(&fake);
        tokio::spawn(async move {
            while let Ok((stream, _)) = ws.accept().await {
                let f = Arc::clone(&f);
                tokio::spawn(async move { f.gateway_connection(stream).await });
            }
        });
        let f = Arc::clone(&fake);
        // Discord takes uploads of up to 25 MiB (the bot keeps to its own, smaller limit).
        let app = Router::new()
            .fallback(move |req: Request| {
                let f = Arc::clone(&f);
                async move { f.rest(req).await }
            })
            .layer(axum::extract::DefaultBodyLimit::max(25 << 20));
        tokio::spawn(async move { axum::serve(rest, app).await.unwrap() });
        fake
    }

    pub fn next_id(&self) -> u64 {
        self.shared.ids.fetch_add(1, Ordering::SeqCst)
    }

    // --- CDN ---------------------------------------------------------------------------

    /// Serves `bytes` at a new CDN URL, returned.
    pub fn host_file(&self, filename: &str, content_type: &str, bytes: Vec<u8>) -> String {
        let path = format!(
            "/cdn/attachments/{CHANNEL_ID}/{}/{filename}",
            self.next_id()
        );
        self.shared
            .cdn
            .lock()
            .unwrap()
            .insert(path.clone(), (content_type.to_string(), bytes));
        format!("{}{path}", self.base)
    }

    /// A CDN URL that answers `302 Found` with `location`, returned.
    pub fn host_redirect(&self, filename: &str, location: &str) -> String {
        let path = format!(
            "/cdn/attachments/{CHANNEL_ID}/{}/{filename}",
            self.next_id()
        );
        self.shared
            .redirects
            .lock()
            .unwrap()
            .insert(path.clone(), location.to_string());
        format!("{}{path}", self.base)
    }

    /// An attachment object for a hosted file. `declared_size` None: the real size.
    pub fn attachment(
        &self,
        filename: &str,
        content_type: &str,
        bytes: Vec<u8>,
        declared_size: Option<u64>,
    ) -> Value {
        let size = declared_size.unwrap_or(bytes.len() as u64);
        let url = self.host_file(filename, content_type, bytes);
        json!({
            "id": self.next_id().to_string(),
            "filename": filename,
            "size": size,
            "url": url,
            "proxy_url": url,
            "content_type": content_type,
            "width": 16,
            "height": 16,
        })
    }

    // --- what the bot did --------------------------------------------------------------

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The requests recorded after the first `start` (cheap to poll in a loop).
    pub fn requests_from(&self, start: usize) -> Vec<Recorded> {
        let requests = self.shared.requests.lock().unwrap();
        requests.get(start..).unwrap_or_default().to_vec()
    }

    /// Waits (at most `timeout`) for a request matching `pred`; panics with the requests seen.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Recorded) -> bool,
    ) -> Recorded {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(r) = self.requests().into_iter().find(|r| pred(r)) {
                return r;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let seen: Vec<String> = self
                    .requests()
                    .iter()
                    .map(|r| {
                        format!(
                            "{} {} {}",
                            r.method,
                            r.path,
                            r.json.as_ref().map(|j| j.to_string()).unwrap_or_default()
                        )
                    })
                    .collect();
                panic!(
                    "timed out waiting for {what}; requests:\n{}",
                    seen.join("\n")
                );
            }
        }
    }

    /// The IDENTIFY payloads the gateway received.
    pub fn identifies(&self) -> Vec<Value> {
        self.shared.identifies.lock().unwrap().clone()
    }

    /// Waits until `n` READY events have been sent in all.
    pub async fn wait_ready(&self, n: u64) {
        let mut rx = self.readies.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|&count| count >= n))
            .await
            .expect("the bot connected to the gateway in time")
            .unwrap();
    }

    /// Answers sticker uploads with this error from now on.
    pub fn fail_stickers(&self, status: u16, code: u64, message: &str) {
        *self.shared.sticker_reply.lock().unwrap() =
            Some((status, json!({ "code": code, "message": message })));
    }

    // --- gateway events ----------------------------------------------------------------

    /// Sends a dispatch event on the newest gateway connection.
    pub fn dispatch(&self, event: &str, data: Value) {
        let tx = self
            .shared
            .gateway
            .lock()
            .unwrap()
            .clone()
            .expect("a gateway connection");
        tx.send(json!({ "op": 0, "t": event, "d": data }))
            .expect("gateway connection open");
    }

    pub fn user(id: u64) -> Value {
        json!({ "id": id.to_string(), "username": format!("user{id}"), "discriminator": "0", "global_name": null, "avatar": null })
    }

    /// An application command interaction: in the guild with the member's permissions, or
    /// in the bot's DM when `member_permissions` is None.
    pub fn command(
        &self,
        token: &str,
        user: u64,
        member_permissions: Option<u64>,
        data: Value,
    ) -> Value {
        let mut i = json!({
            "id": self.next_id().to_string(),
            "application_id": APP_ID.to_string(),
            "type": 2,
            "data": data,
            "token": token,
            "version": 1,
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": 10_485_760,
            "authorizing_integration_owners": {},
        });
        match member_permissions {
            Some(perms) => {
                i["guild_id"] = json!(GUILD_ID.to_string());
                i["guild_locale"] = json!("en-US");
                i["channel_id"] = json!(CHANNEL_ID.to_string());
                i["context"] = json!(0);
                i["app_permissions"] = json!((PERM_ALL_TEXT | PERM_CREATE_EXPRESSIONS).to_string());
                i["member"] = json!({
                    "user": Self::user(user),
                    "roles": [],
                    "joined_at": TIMESTAMP,
                    "deaf": false,
                    "mute": false,
                    "flags": 0,
                    "permissions": perms.to_string(),
                });
            }
            None => {
                i["channel_id"] = json!(DM_CHANNEL_ID.to_string());
                i["context"] = json!(1);
                i["app_permissions"] = json!(PERM_ALL_TEXT.to_string());
                i["user"] = Self::user(user);
            }
        }
        i
    }

    /// `/cartoon photo:<attachment> [style] [output]` data.
    pub fn cartoon_data(attachment: &Value, style: Option<&str>, output: Option<&str>) -> Value {
        let id = attachment["id"].clone();
        let mut options = vec![json!({ "name": "photo", "type": 11, "value": id })];
        if let Some(s) = style {
            options.push(json!({ "name": "style", "type": 3, "value": s }));
        }
        if let Some(o) = output {
            options.push(json!({ "name": "output", "type": 3, "value": o }));
        }
        json!({
            "id": "900", "name": "cartoon", "type": 1, "options": options,
            "resolved": { "attachments": { id.as_str().unwrap(): attachment } },
        })
    }

    /// Slash command data with a sub command, e.g. `/preset set style:ink`.
    pub fn sub_command_data(name: &str, sub: &str, options: Value) -> Value {
        json!({ "id": "901", "name": name, "type": 1, "options": [{ "name": sub, "type": 1, "options": options }] })
    }

    /// A message (as in MESSAGE_CREATE, or resolved for a message command).
    pub fn message(
        &self,
        author: u64,
        channel: u64,
        content: &str,
        attachments: Vec<Value>,
    ) -> Value {
        json!({
            "id": self.next_id().to_string(),
            "channel_id": channel.to_string(),
            "author": Self::user(author),
            "content": content,
            "timestamp": TIMESTAMP,
            "edited_timestamp": null,
            "tts": false,
            "mention_everyone": false,
            "mentions": [],
            "mention_roles": [],
            "attachments": attachments,
            "embeds": [],
            "pinned": false,
            "type": 0,
        })
    }

    // --- internals -----------------------------------------------------------------------

    async fn gateway_connection(self: Arc<Self>, stream: tokio::net::TcpStream) {
        let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
            return;
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
        let mut seq = 0u64;
        let hello = json!({ "op": 10, "d": { "heartbeat_interval": 41250 } });
        if ws.send(WsMessage::Text(hello.to_string())).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                incoming = ws.next() => {
                    let Some(Ok(msg)) = incoming else { break };
                    let WsMessage::Text(text) = msg else {
                        if matches!(msg, WsMessage::Close(_)) { break }
                        continue;
                    };
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    match v["op"].as_u64() {
                        Some(1) => {
                            let ack = json!({ "op": 11 });
                            let _ = ws.send(WsMessage::Text(ack.to_string())).await;
                        }
                        Some(2) => {
                            self.shared.identifies.lock().unwrap().push(v["d"].clone());
                            *self.shared.gateway.lock().unwrap() = Some(tx.clone());
                            seq += 1;
                            let ready = json!({
                                "op": 0, "t": "READY", "s": seq,
                                "d": {
                                    "v": 10,
                                    "user": { "id": BOT_ID.to_string(), "username": "toonbot", "discriminator": "0", "bot": true, "avatar": null, "global_name": null },
                                    "guilds": [],
                                    "session_id": "fake-session",
                                    "resume_gateway_url": self.shared.ws_url.lock().unwrap().clone(),
                                    "shard": [0, 1],
                                    "application": { "id": APP_ID.to_string(), "flags": 0 },
                                },
                            });
                            if ws.send(WsMessage::Text(ready.to_string())).await.is_err() { break }
                            self.readies.send_modify(|n| *n += 1);
                        }
                        _ => {}
                    }
                }
                event = rx.recv() => {
                    let Some(mut event) = event else { break };
                    seq += 1;
                    event["s"] = json!(seq);
                    if ws.send(WsMessage::Text(event.to_string())).await.is_err() { break }
                }
            }
        }
    }

    async fn rest(&self, req: Request) -> Response {
        let method = req.method().clone();
        let uri = req.uri().clone();
        let full_path = uri.path().to_string();
        if method == Method::GET && full_path.starts_with("/cdn/") {
            if let Some(location) = self.shared.redirects.lock().unwrap().get(&full_path) {
                return (StatusCode::FOUND, [(header::LOCATION, location.clone())]).into_response();
            }
            let file = self.shared.cdn.lock().unwrap().get(&full_path).cloned();
            return match file {
                Some((ct, bytes)) => ([(header::CONTENT_TYPE, ct)], bytes).into_response(),
                None => StatusCode::NOT_FOUND.into_response(),
            };
        }
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let is_multipart = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("multipart/form-data"));
        let (mut json, mut fields, mut files) = (None, HashMap::new(), Vec::new());
        if is_multipart {
            let mut form = Multipart::from_request(req, &())
                .await
                .expect("a valid multipart body");
            while let Some(field) = form.next_field().await.expect("a valid multipart field") {
                let name = field.name().unwrap_or("").to_string();
                let filename = field.file_name().map(String::from);
                let content_type = field.content_type().map(String::from);
                let bytes = field.bytes().await.unwrap().to_vec();
                if name == "payload_json" {
                    json = Some(serde_json::from_slice(&bytes).expect("payload_json is JSON"));
                } else if filename.is_some() {
                    files.push(Part {
                        field: name,
                        filename,
                        content_type,
                        bytes,
                    });
                } else {
                    fields.insert(name, String::from_utf8_lossy(&bytes).into_owned());
                }
            }
        } else {
            let body = to_bytes(req.into_body(), 64 << 20).await.unwrap();
            if !body.is_empty() {
                json = serde_json::from_slice(&body).ok();
            }
        }
        let path = full_path
            .strip_prefix("/api/v10")
            .unwrap_or(&full_path)
            .to_string();
        let recorded = Recorded {
            method: method.to_string(),
            path: path.clone(),
            query: uri.query().unwrap_or("").to_string(),
            json,
            fields,
            files,
            authorization,
            at: Instant::now(),
        };
        let response = self.answer(&recorded);
        self.shared.requests.lock().unwrap().push(recorded);
        self.changed.send_modify(|n| *n += 1);
        response
    }

    fn answer(&self, r: &Recorded) -> Response {
        let segments: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
        let ok = |v: Value| (StatusCode::OK, axum::Json(v)).into_response();
        let no_content = || StatusCode::NO_CONTENT.into_response();
        match (r.method.as_str(), segments.as_slice()) {
            ("GET", ["gateway"]) => {
                ok(json!({ "url": self.shared.ws_url.lock().unwrap().clone() }))
            }
            ("GET", ["gateway", "bot"]) => ok(json!({
                "url": self.shared.ws_url.lock().unwrap().clone(),
                "shards": 1,
                "session_start_limit": { "total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1 },
            })),
            ("PUT", ["applications", _, "commands"])
            | ("PUT", ["applications", _, "guilds", _, "commands"]) => ok(json!([])),
            ("POST", ["interactions", _, _, "callback"]) => no_content(),
            ("DELETE", ["webhooks", _, _, "messages", _]) => no_content(),
            ("PATCH", ["webhooks", _, _, "messages", _]) | ("POST", ["webhooks", _, _]) => {
                ok(self.message_reply(CHANNEL_ID, r))
            }
            ("POST", ["channels", channel, "messages"])
            | ("PATCH", ["channels", channel, "messages", _]) => {
                let channel = channel.parse().unwrap_or(CHANNEL_ID);
                let mut m = self.message_reply(channel, r);
                if let ["channels", _, "messages", id] = segments.as_slice() {
                    m["id"] = json!(id);
                }
                ok(m)
            }
            ("POST", ["users", "@me", "channels"]) => ok(json!({
                "id": DM_CHANNEL_ID.to_string(),
                "type": 1,
                "last_message_id": null,
                "recipients": [Self::user(
                    r.json
                        .as_ref()
                        .and_then(|j| j["recipient_id"].as_str()?.parse().ok())
                        .unwrap_or(0)
                )],
            })),
            ("POST", ["guilds", guild, "stickers"]) => {
                if let Some((status, body)) = self.shared.sticker_reply.lock().unwrap().clone() {
                    return (StatusCode::from_u16(status).unwrap(), axum::Json(body))
                        .into_response();
                }
                ok(json!({
                    "id": self.next_id().to_string(),
                    "name": r.fields.get("name").cloned().unwrap_or_default(),
                    "description": r.fields.get("description").cloned(),
                    "tags": r.fields.get("tags").cloned().unwrap_or_default(),
                    "type": 2,
                    "format_type": 1,
                    "available": true,
                    "guild_id": guild,
                }))
            }
            _ => (
                StatusCode::NOT_FOUND,
                axum::Json(json!({ "code": 0, "message": "404: Not Found" })),
            )
                .into_response(),
        }
    }

    fn message_reply(&self, channel: u64, r: &Recorded) -> Value {
        let attachments: Vec<Value> = r
            .files
            .iter()
            .map(|f| {
                let url = self.host_file(f.filename.as_deref().unwrap_or("file"), "image/png", f.bytes.clone());
                json!({ "id": self.next_id().to_string(), "filename": f.filename, "size": f.bytes.len(), "url": url, "proxy_url": url })
            })
            .collect();
        let mut m = self.message(BOT_ID, channel, &r.content(), attachments);
        m["author"]["bot"] = json!(true);
        m
    }
}
