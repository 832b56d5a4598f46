//! Alerts on policy changes: each new policy history record is POSTed as JSON to the URL of
//! `--history-webhook` (http or https, the system's roots), from a task of its own. A slow,
//! failing or hanging endpoint never holds a policy push: records wait in a bounded queue, each
//! POST has a deadline and a few attempts, and what cannot be delivered is logged (the record
//! stays in the history file).
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::sync::mpsc;

use crate::history::Record;

/// Records waiting to be sent; beyond them a record is not sent (and the drop is logged).
pub const QUEUE: usize = 64;
/// Each POST must be answered within this.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per record, one second apart and then two.
pub const ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("--history-webhook {url:?}: {reason}")]
    Url { url: String, reason: String },
}

/// The sending side: cheap to call from the policy path.
#[derive(Clone, Debug)]
pub struct Webhook {
    tx: mpsc::Sender<Record>,
}

impl Webhook {
    /// Checks `url` and starts the sender.
    pub fn start(url: &str) -> Result<Webhook, WebhookError> {
        let bad = |reason: String| WebhookError::Url {
            url: url.to_owned(),
            reason,
        };
        let uri: hyper::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(bad(
                "an http:// or https:// URL with a host is needed".into()
            ));
        }
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(crate::tls::provider())
            .map_err(|e| bad(format!("the system's trust roots: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
        let (tx, mut rx) = mpsc::channel::<Record>(QUEUE);
        tokio::spawn(async move {
            while let Some(record) = rx.recv().await {
                deliver(&client, &uri, &record).await;
            }
        });
        Ok(Webhook { tx })
    }

    /// Queues `record` for sending; never waits.
    pub fn send(&self, record: &Record) {
        if let Err(e) = self.tx.try_send(record.clone()) {
            crate::metrics::counters().webhook_failures.inc();
            tracing::warn!(
                history_version = record.version,
                error = %e,
                "history webhook: record not sent (the queue is full); it stays in the history"
            );
        }
    }
}

async fn deliver<C>(client: &Client<C, Full<Bytes>>, uri: &hyper::Uri, record: &Record)
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let body = Bytes::from(serde_json::to_vec(record).expect("a record serializes"));
    for attempt in 1..=ATTEMPTS {
        let request = hyper::Request::post(uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, "ward-control")
            .body(Full::new(body.clone()))
            .expect("a POST request builds");
        let outcome = match tokio::time::timeout(TIMEOUT, client.request(request)).await {
            Err(_) => Err(format!("no answer within {} s", TIMEOUT.as_secs())),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(response)) if response.status().is_success() => Ok(()),
            Ok(Ok(response)) => Err(format!("answered {}", response.status())),
        };
        match outcome {
            Ok(()) => {
                tracing::debug!(history_version = record.version, "history webhook: sent");
                return;
            }
            Err(error) => tracing::warn!(
                history_version = record.version,
                attempt,
                attempts = ATTEMPTS,
                error,
                "history webhook: POST failed"
            ),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
        }
    }
    crate::metrics::counters().webhook_failures.inc();
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_url_that_is_not_http_is_refused_naming_it() {
        for url in [
            "ftp://alerts.example/hook",
            "alerts.example/hook",
            "http://",
            "not a url",
        ] {
            let err = super::Webhook::start(url).expect_err(url);
            assert!(err.to_string().contains(url), "{err}");
        }
    }
}
