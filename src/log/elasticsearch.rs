//! The HTTP side of Elasticsearch (and OpenSearch, which shares these APIs): a reqwest client
//! with authentication and TLS, the index template upload and one bulk request.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde_json::Value;
use url::Url;

use super::bulk::{classify_request_failure, parse_response, BulkError, ItemOutcome};
use super::settings::{Auth, LogSettings};

/// Errors setting up or talking to Elasticsearch outside the bulk path.
#[derive(Debug, thiserror::Error)]
pub enum ElasticsearchError {
    #[error("Elasticsearch client setup: {0}")]
    Setup(String),
    /// Unreachable or overloaded: worth retrying.
    #[error("Elasticsearch at {url} unavailable: {reason}")]
    Unavailable { url: String, reason: String },
    /// Refused for good, with the server's answer.
    #[error("Elasticsearch refused {what}: HTTP {status}: {body}")]
    Refused {
        what: String,
        status: u16,
        body: String,
    },
}

impl ElasticsearchError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ElasticsearchError::Unavailable { .. })
    }
}

/// A cheap-to-clone client bound to one cluster.
#[derive(Clone)]
pub struct Elasticsearch {
    http: reqwest::Client,
    base: Url,
    auth: Auth,
}

impl Elasticsearch {
    pub fn new(base: &Url, settings: &LogSettings) -> Result<Elasticsearch, ElasticsearchError> {
        let mut builder = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(Duration::from_secs(5))
            .tls_danger_accept_invalid_certs(settings.insecure);
        if let Some(path) = &settings.ca_cert {
            let pem = std::fs::read(path).map_err(|e| {
                ElasticsearchError::Setup(format!("reading CA certificate {}: {e}", path.display()))
            })?;
            let certificate = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                ElasticsearchError::Setup(format!("CA certificate {}: {e}", path.display()))
            })?;
            builder = builder.add_root_certificate(certificate);
        }
        let http = builder
            .build()
            .map_err(|e| ElasticsearchError::Setup(e.to_string()))?;
        Ok(Elasticsearch {
            http,
            base: base.clone(),
            auth: settings.auth.clone(),
        })
    }

    /// A request with the configured credentials (reqwest marks the header sensitive).
    fn request(&self, method: reqwest::Method, url: Url) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match &self.auth {
            Auth::None => request,
            Auth::Basic { username, password } => {
                request.basic_auth(username, Some(password.expose()))
            }
            Auth::ApiKey(key) => request.header(AUTHORIZATION, format!("ApiKey {}", key.expose())),
        }
    }

    fn url(&self, path: &str) -> Url {
        // `base` ends with '/', so join appends; the paths used here are constant and valid.
        self.base.join(path).unwrap_or_else(|_| self.base.clone())
    }

    /// `PUT _index_template/<name>`; idempotent, so every start-up re-applies the current mapping.
    pub async fn put_index_template(
        &self,
        name: &str,
        template: &Value,
    ) -> Result<(), ElasticsearchError> {
        let url = self.url(&format!("_index_template/{name}"));
        let response = self
            .request(reqwest::Method::PUT, url.clone())
            .json(template)
            .send()
            .await
            .map_err(|e| self.unavailable(e))?;
        let status = response.status().as_u16();
        if response.status().is_success() {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        if status == 429 || status >= 500 {
            return Err(ElasticsearchError::Unavailable {
                url: url.to_string(),
                reason: format!("HTTP {status}: {body}"),
            });
        }
        Err(ElasticsearchError::Refused {
            what: format!("index template {name}"),
            status,
            body,
        })
    }

    /// Sends one bulk body; per-item outcomes in request order, or why the whole request failed.
    pub async fn bulk(&self, body: Vec<u8>, items: usize) -> Result<Vec<ItemOutcome>, BulkError> {
        let response = self
            .request(reqwest::Method::POST, self.url("_bulk"))
            .header(CONTENT_TYPE, "application/x-ndjson")
            .body(body)
            .send()
            .await
            .map_err(|e| BulkError::Retryable(self.unavailable(e).to_string()))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| BulkError::Retryable(format!("reading the bulk response: {e}")))?;
        if !status.is_success() {
            return Err(classify_request_failure(
                status.as_u16(),
                &String::from_utf8_lossy(&bytes),
            ));
        }
        parse_response(&bytes, items)
    }

    fn unavailable(&self, error: reqwest::Error) -> ElasticsearchError {
        // Without the URL: reqwest's message would repeat it; credentials are never in it.
        ElasticsearchError::Unavailable {
            url: crate::config::redact_url(self.base.as_str()),
            reason: error.without_url().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::settings::{LogArgs, Secret};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves one request with `status` and `body`; returns the raw request text.
    async fn one_request(
        status: u16,
        body: &'static str,
    ) -> (Url, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 65536];
            let n = socket.read(&mut request).await.unwrap();
            let response = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(response.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&request[..n]).into_owned()
        });
        (url, server)
    }

    fn settings(args: LogArgs) -> LogSettings {
        LogSettings::resolve(&args, &Default::default()).unwrap()
    }

    #[tokio::test]
    async fn credentials_go_in_the_authorization_header() {
        let basic = LogArgs {
            elasticsearch_username: Some("elastic".into()),
            elasticsearch_password: Some("changeme".parse::<Secret>().unwrap()),
            ..Default::default()
        };
        let api_key = LogArgs {
            elasticsearch_api_key: Some("a2V5OnNlY3JldA==".parse::<Secret>().unwrap()),
            ..Default::default()
        };
        for (args, expected) in [
            (basic, "authorization: Basic ZWxhc3RpYzpjaGFuZ2VtZQ=="),
            (api_key, "authorization: ApiKey a2V5OnNlY3JldA=="),
        ] {
            let (url, server) = one_request(200, r#"{"acknowledged":true}"#).await;
            let client = Elasticsearch::new(&url, &settings(args)).unwrap();
            client
                .put_index_template("t", &serde_json::json!({}))
                .await
                .unwrap();
            let request = server.await.unwrap().to_ascii_lowercase();
            assert!(request.starts_with("put /_index_template/t "), "{request}");
            assert!(
                request.contains(&expected.to_ascii_lowercase()),
                "{request}"
            );
        }
    }

    #[tokio::test]
    async fn overload_is_retryable_and_bad_requests_are_refused() {
        let (url, server) = one_request(429, "{}").await;
        let client = Elasticsearch::new(&url, &settings(LogArgs::default())).unwrap();
        let error = client.bulk(b"{}\n".to_vec(), 1).await.unwrap_err();
        assert!(matches!(error, BulkError::Retryable(_)), "{error}");
        assert!(server.await.unwrap().contains("application/x-ndjson"));
        let (url, _server) = one_request(400, r#"{"error":"bad"}"#).await;
        let client = Elasticsearch::new(&url, &settings(LogArgs::default())).unwrap();
        let error = client
            .put_index_template("t", &serde_json::json!({}))
            .await
            .unwrap_err();
        assert!(!error.is_retryable(), "{error}");
    }
}
