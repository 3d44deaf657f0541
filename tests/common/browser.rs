//! A real headless Chromium (Debian's, installed by scripts/setup) driven over the DevTools
//! protocol: open a page, read what it shows, collect its console, take a screenshot.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::{unique, wait_until};

/// Where scripts/setup's `apt-get install chromium` puts it; `EVENTPIPE_CHROMIUM` overrides.
const CHROMIUM: &str = "/usr/bin/chromium";

/// How long one DevTools command may take (bounds a hang, never a pace).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A line the page wrote to its console, or the browser logged for it.
#[derive(Debug, Clone)]
pub struct ConsoleLine {
    /// `log`, `info`, `warning`, `error` (console calls); `log:<level>` for the browser's own.
    pub kind: String,
    pub text: String,
}

/// Headless Chromium with one page, in its own process group and temporary profile, both gone
/// when it is dropped.
pub struct Chromium {
    process: BrowserProcess,
    page: Socket,
    next_id: u64,
    /// Everything the page printed so far (read as commands are answered).
    pub console: Vec<ConsoleLine>,
    /// Uncaught exceptions of the page's scripts.
    pub exceptions: Vec<String>,
    /// The URL of every request the page made (fetch, EventSource, WebSocket), in order.
    pub requests: Vec<String>,
    /// How many times a document finished loading.
    loads: u64,
}

impl Chromium {
    /// Starts Chromium with a fresh profile and a blank page, and attaches to that page.
    /// Panics with what to do when Chromium is not installed.
    pub async fn launch(width: u32, height: u32) -> Chromium {
        let binary = std::env::var("EVENTPIPE_CHROMIUM").unwrap_or_else(|_| CHROMIUM.into());
        assert!(
            Path::new(&binary).exists(),
            "Chromium is not installed at {binary}: run scripts/setup, which installs Debian's \
             chromium package (or point EVENTPIPE_CHROMIUM at a Chromium binary)"
        );
        let profile = std::env::temp_dir().join(unique("chromium-profile"));
        std::fs::create_dir_all(&profile).unwrap();
        let log = std::fs::File::create(profile.join("chromium.log")).unwrap();
        let child = Command::new(&binary)
            .args([
                "--headless",
                // Tests run as root, where Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                // The machine has no network but loopback: no background connections.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--mute-audio",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                &format!("--window-size={width},{height}"),
                &format!("--user-data-dir={}", profile.display()),
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its own group: dropping it ends the renderer and helper processes too.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{binary} does not start: {e}"));
        // From here on a failure still ends the browser and removes its profile.
        let mut process = BrowserProcess { child, profile };
        let page = process.attach().await;
        let mut chromium = Chromium {
            process,
            page,
            next_id: 0,
            console: Vec::new(),
            exceptions: Vec::new(),
            requests: Vec::new(),
            loads: 0,
        };
        chromium.call("Runtime.enable", json!({})).await;
        chromium.call("Log.enable", json!({})).await;
        chromium.call("Page.enable", json!({})).await;
        chromium.call("Network.enable", json!({})).await;
        chromium
    }

    /// What Chromium itself printed (for a failure's message).
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Sends a DevTools command and returns its result; events read meanwhile are kept.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({"id": id, "method": method, "params": params}).to_string();
        self.page
            .send(Message::text(command))
            .await
            .unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let message = self.read(deadline, method).await;
            if message["id"] == id {
                if let Some(error) = message.get("error") {
                    panic!("DevTools {method}: {error}");
                }
                return message["result"].clone();
            }
            self.keep(&message);
        }
    }

    /// The next message from the page's socket.
    async fn read(&mut self, deadline: Instant, waiting_for: &str) -> Value {
        loop {
            let message = tokio::time::timeout_at(deadline.into(), self.page.next())
                .await
                .unwrap_or_else(|_| panic!("DevTools: no {waiting_for} in {COMMAND_TIMEOUT:?}"))
                .unwrap_or_else(|| panic!("DevTools: the socket closed awaiting {waiting_for}"))
                .unwrap_or_else(|e| panic!("DevTools, awaiting {waiting_for}: {e}"));
            if let Message::Text(text) = message {
                return serde_json::from_str(&text).expect("DevTools speaks JSON");
            }
        }
    }

    /// Keeps the console, exception and request events.
    fn keep(&mut self, message: &Value) {
        let params = &message["params"];
        match message["method"].as_str() {
            Some("Runtime.consoleAPICalled") => {
                let text = params["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|arg| match &arg["value"] {
                        Value::String(text) => text.clone(),
                        Value::Null => arg["description"].as_str().unwrap_or("").to_string(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                let kind = params["type"].as_str().unwrap_or("log").to_string();
                self.console.push(ConsoleLine { kind, text });
            }
            Some("Log.entryAdded") => self.console.push(ConsoleLine {
                kind: format!("log:{}", params["entry"]["level"].as_str().unwrap_or("")),
                text: params["entry"]["text"].as_str().unwrap_or("").to_string(),
            }),
            Some("Network.requestWillBeSent") => {
                if let Some(url) = params["request"]["url"].as_str() {
                    self.requests.push(url.to_string());
                }
            }
            Some("Network.webSocketCreated") => {
                if let Some(url) = params["url"].as_str() {
                    self.requests.push(url.to_string());
                }
            }
            Some("Page.loadEventFired") => self.loads += 1,
            Some("Runtime.exceptionThrown") => {
                self.exceptions.push(params["exceptionDetails"].to_string())
            }
            _ => {}
        }
    }

    /// Opens `url` in the page and waits until it has loaded.
    pub async fn navigate(&mut self, url: &str) {
        let loads = self.loads;
        let result = self.call("Page.navigate", json!({"url": url})).await;
        assert!(
            result.get("errorText").is_none(),
            "navigating to {url}: {result}"
        );
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        while self.loads == loads {
            let message = self.read(deadline, "Page.loadEventFired").await;
            self.keep(&message);
        }
    }

    /// The value of a JavaScript expression in the page (awaited if it is a promise).
    pub async fn evaluate(&mut self, expression: &str) -> Value {
        self.try_evaluate(expression)
            .await
            .unwrap_or_else(|exception| panic!("evaluating {expression}: {exception}"))
    }

    /// [`Chromium::evaluate`], with the exception it threw as the error.
    pub async fn try_evaluate(&mut self, expression: &str) -> Result<Value, String> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        match result.get("exceptionDetails") {
            Some(exception) => Err(exception.to_string()),
            None => Ok(result["result"]["value"].clone()),
        }
    }

    /// Polls `expression` until `accept` takes its value (returning what it maps it to); panics
    /// after `timeout` with the last value seen.
    pub async fn wait_for<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        expression: &str,
        accept: impl Fn(&Value) -> Result<T, String>,
    ) -> T {
        wait_until(timeout, what, async || {
            accept(&self.try_evaluate(expression).await?)
        })
        .await
    }

    /// A PNG of what the page shows now, written to `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        use base64::Engine;
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("a screenshot"))
            .expect("base64");
        std::fs::write(path, png).unwrap();
    }
}

/// The browser's processes and profile.
struct BrowserProcess {
    child: Child,
    profile: PathBuf,
}

impl BrowserProcess {
    /// The DevTools socket of the blank page, once Chromium says where it listens.
    async fn attach(&mut self) -> Socket {
        let port_file = self.profile.join("DevToolsActivePort");
        let port: u16 = wait_until(
            Duration::from_secs(30),
            "Chromium's DevTools port",
            async || {
                if let Some(status) = self.child.try_wait().unwrap() {
                    panic!("Chromium exited ({status}):\n{}", self.log());
                }
                let text = std::fs::read_to_string(&port_file).map_err(|e| e.to_string())?;
                text.lines()
                    .next()
                    .and_then(|line| line.trim().parse().ok())
                    .ok_or_else(|| format!("{port_file:?} holds {text:?}"))
            },
        )
        .await;
        let list = format!("http://127.0.0.1:{port}/json/list");
        let page_url = wait_until(Duration::from_secs(30), "Chromium's page", async || {
            let targets: Value = reqwest::get(&list)
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            targets
                .as_array()
                .into_iter()
                .flatten()
                .find(|target| target["type"] == "page")
                .and_then(|target| target["webSocketDebuggerUrl"].as_str())
                .map(String::from)
                .ok_or_else(|| format!("no page among {targets}"))
        })
        .await;
        let (socket, _) = tokio_tungstenite::connect_async(page_url.as_str())
            .await
            .unwrap_or_else(|e| panic!("DevTools at {page_url}: {e}"));
        socket
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.profile.join("chromium.log")).unwrap_or_default()
    }
}

impl Drop for BrowserProcess {
    fn drop(&mut self) {
        // The whole group: the browser, its renderers and helpers.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
