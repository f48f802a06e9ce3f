//! The CLI's hub client: every command talks to the hub only through its HTTP API, here.
//!
//! Errors come back as sentences an operator can act on: the hub's own message for a 4xx, a
//! hint about TLS or the URL when the hub cannot be reached.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use drover_protocol::error::ErrorBody;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// How to reach a hub.
#[derive(Debug, Clone)]
pub struct HubClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// Installs ring as rustls's crypto provider (reqwest is built without one). Idempotent.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An HTTP client that trusts `ca_file` only (when given) or the system's roots.
pub fn http_client(
    ca_file: Option<&Path>,
    timeout: Option<Duration>,
) -> anyhow::Result<reqwest::Client> {
    install_crypto();
    let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
    if let Some(timeout) = timeout {
        builder = builder.timeout(timeout);
    }
    if let Some(ca) = ca_file {
        builder = builder.use_preconfigured_tls(tls_trusting(ca)?);
    }
    builder.build().context("building the HTTP client")
}

/// A rustls client config that trusts only the CA certificates in `ca_file`.
pub fn tls_trusting(ca_file: &Path) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the CA file {}", ca_file.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", ca_file.display());
    }
    for cert in certs {
        roots
            .add(cert)
            .with_context(|| format!("using the CA in {}", ca_file.display()))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl HubClient {
    /// A client for `base` with an operator token.
    pub fn new(base: &str, token: &str, ca_file: Option<&Path>) -> anyhow::Result<HubClient> {
        Ok(HubClient {
            http: http_client(ca_file, None)?,
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
        })
    }

    /// The hub's URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The underlying HTTP client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The operator token.
    pub fn token(&self) -> &str {
        &self.token
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(60))
    }

    /// Sends a request with an optional JSON body and decodes a JSON answer.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> anyhow::Result<T> {
        let mut request = self.request(method.clone(), path);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| self.unreachable(e))?;
        decode(response, &method, path).await
    }

    /// GET and decode.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// GET, or `None` on 404.
    pub async fn get_optional<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<Option<T>> {
        let response = self
            .request(Method::GET, path)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        decode(response, &Method::GET, path).await.map(Some)
    }

    /// GET a text body (CSV, say).
    pub async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let response = self
            .request(Method::GET, path)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if response.status().is_success() {
            return response
                .text()
                .await
                .with_context(|| format!("reading the answer to GET {path}"));
        }
        decode::<serde_json::Value>(response, &Method::GET, path)
            .await
            .map(|_| String::new())
    }

    /// POST a JSON body and decode.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &(impl Serialize + ?Sized),
    ) -> anyhow::Result<T> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// PATCH a JSON body and decode.
    pub async fn patch<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &(impl Serialize + ?Sized),
    ) -> anyhow::Result<T> {
        self.call(Method::PATCH, path, Some(body)).await
    }

    /// PUT a streamed body and decode.
    pub async fn put_body<T: DeserializeOwned>(
        &self,
        path: &str,
        body: reqwest::Body,
        length: u64,
    ) -> anyhow::Result<T> {
        let response = self
            .http
            .put(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_LENGTH, length)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        decode(response, &Method::PUT, path).await
    }

    fn unreachable(&self, err: reqwest::Error) -> anyhow::Error {
        let mut message = format!("could not reach the hub at {}: {err}", self.base);
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        if message.contains("certificate") || message.contains("UnknownIssuer") {
            message.push_str(
                "\nhint: the hub's certificate is not trusted; pass its CA with --ca (for a hub with a local CA: <data_dir>/tls/ca.pem)",
            );
        } else if message.contains("Connection refused") {
            message.push_str("\nhint: is the hub running, and is the URL right?");
        }
        anyhow::anyhow!(message)
    }
}

async fn decode<T: DeserializeOwned>(
    response: reqwest::Response,
    method: &Method,
    path: &str,
) -> anyhow::Result<T> {
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("reading the answer to {method} {path}"))?;
    if status.is_success() {
        let text = if text.is_empty() { "null" } else { &text };
        return serde_json::from_str(text).with_context(|| {
            format!("the hub's answer to {method} {path} is not what this CLI expects")
        });
    }
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => {
            let hint = match body.error.as_str() {
                "missing_token" | "invalid_token" => {
                    "\nhint: run 'drover login --hub URL --token TOKEN' (or set DROVER_TOKEN)"
                }
                _ => "",
            };
            bail!(
                "the hub refused {method} {path}: {} ({}, HTTP {}){hint}",
                body.message,
                body.error,
                status.as_u16()
            )
        }
        Err(_) => bail!(
            "{method} {path} failed with HTTP {}: {}",
            status.as_u16(),
            text.chars().take(300).collect::<String>()
        ),
    }
}
