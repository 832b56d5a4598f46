//! The gRPC service: Join, Renew and Stream, and who may call which.
use std::{collections::HashMap, pin::Pin, sync::Arc, sync::Mutex};

use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use ward_proto::{
    control_server::Control, AgentMessage, JoinRequest, JoinResponse, RenewRequest, RenewResponse,
    ServerMessage, SignWorkloadRequest, SignWorkloadResponse,
};

use crate::{
    ca::{Ca, CaError, PeerNode},
    hub::Hub,
    limits::{self, TokenBucket},
    session::Session,
    token_review::{self, ReviewError, TokenReviewer},
    tokens::{JoinTokens, TokenError},
};

pub struct ControlService {
    hub: Arc<Hub>,
    ca: Arc<Ca>,
    tokens: Arc<JoinTokens>,
    /// Reviews agents' service account tokens (`--kubernetes`); without it only join tokens join.
    reviewer: Option<Arc<TokenReviewer>>,
    joins: Mutex<TokenBucket>,
    /// One bucket per node for `SignWorkload`; the nodes are those holding a certificate.
    workload_signs: Mutex<HashMap<String, TokenBucket>>,
}

#[derive(Debug, thiserror::Error)]
enum JoinError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Review(#[from] ReviewError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("join task failed")]
    Task,
}

impl From<JoinError> for Status {
    fn from(e: JoinError) -> Status {
        match &e {
            JoinError::Token(TokenError::Read { .. } | TokenError::State(_)) => {
                Status::internal("the control plane cannot read its token file or state")
            }
            JoinError::Token(_) => Status::permission_denied(e.to_string()),
            JoinError::Review(ReviewError::Api(_)) => {
                Status::unavailable("the control plane cannot reach the Kubernetes API")
            }
            JoinError::Review(_) => Status::permission_denied(e.to_string()),
            JoinError::Ca(CaError::Csr(_) | CaError::NodeName { .. }) => {
                Status::invalid_argument(e.to_string())
            }
            JoinError::Ca(_) => Status::internal("signing failed"),
            JoinError::Task => Status::internal("join task failed"),
        }
    }
}

/// Why a revoked node's calls fail.
pub const REVOKED_NODE: &str =
    "this node is revoked (ward-control revoke --node); remove its line from the revocation file, then join again";

fn remote<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map_or_else(|| "unknown".into(), |a| a.to_string())
}

impl ControlService {
    pub fn new(hub: Arc<Hub>, ca: Arc<Ca>, tokens: Arc<JoinTokens>) -> Self {
        ControlService {
            hub,
            ca,
            tokens,
            reviewer: None,
            joins: Mutex::new(TokenBucket::new(
                limits::JOIN_BURST,
                limits::JOINS_PER_SECOND,
            )),
            workload_signs: Mutex::new(HashMap::new()),
        }
    }

    /// Admits agents' service account tokens too, reviewed by `reviewer`.
    pub fn with_token_review(mut self, reviewer: Option<Arc<TokenReviewer>>) -> Self {
        self.reviewer = reviewer;
        self
    }

    /// Signs `node`'s certificate if `token` admits it: a service account token the cluster
    /// vouches for (with `--kubernetes`), or a join token, which is spent.
    async fn admit(
        &self,
        token: String,
        node: String,
        csr_pem: String,
    ) -> Result<String, JoinError> {
        let ca = self.ca.clone();
        if let Some(reviewer) = &self.reviewer {
            if token_review::is_service_account_token(&token) {
                reviewer.review(&token, &node).await?;
                return tokio::task::spawn_blocking(move || ca.sign_node(&node, &csr_pem))
                    .await
                    .map_err(|_| JoinError::Task)?
                    .map_err(JoinError::from);
            }
        }
        let tokens = self.tokens.clone();
        let key = crate::ca::csr_key(&csr_pem)?;
        tokio::task::spawn_blocking(move || {
            tokens.redeem(&token, &node, &key, || -> Result<String, JoinError> {
                Ok(ca.sign_node(&node, &csr_pem)?)
            })
        })
        .await
        .map_err(|_| JoinError::Task)?
    }

    /// Takes a token from `node`'s `SignWorkload` bucket.
    fn may_sign_workload(&self, node: &str) -> bool {
        let mut buckets = self
            .workload_signs
            .lock()
            .expect("workload signing limiter poisoned");
        buckets
            .entry(node.to_owned())
            .or_insert_with(|| {
                TokenBucket::new(
                    limits::WORKLOAD_SIGN_BURST,
                    limits::WORKLOAD_SIGNS_PER_SECOND,
                )
            })
            .try_take()
    }

    /// The node named by the request's client certificate, which the TLS layer has verified.
    fn peer<T>(&self, request: &Request<T>) -> Result<PeerNode, Status> {
        let certs = request
            .peer_certs()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                tracing::warn!(
                    peer = remote(request),
                    "call refused: no client certificate"
                );
                Status::unauthenticated(
                "a client certificate signed by this control plane's CA is required; join first",
            )
            })?;
        let peer = self.ca.node_of(&certs[0]).map_err(|e| {
            tracing::warn!(peer = remote(request), error = %e, "call refused");
            Status::permission_denied(e.to_string())
        })?;
        if self.hub.node_revoked(&peer.node) {
            tracing::warn!(
                peer = remote(request),
                node = peer.node,
                "call refused: the node is revoked"
            );
            return Err(Status::permission_denied(REVOKED_NODE));
        }
        Ok(peer)
    }
}

type ServerStream = Pin<Box<dyn Stream<Item = Result<ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let peer = remote(&request);
        if !self.joins.lock().expect("join limiter poisoned").try_take() {
            tracing::warn!(peer, "join refused: too many joins; slow down");
            return Err(Status::resource_exhausted("too many joins; retry later"));
        }
        let JoinRequest {
            token,
            node,
            csr_pem,
        } = request.into_inner();
        let node_shown = limits::truncate(&node, 253).to_owned();
        if self.hub.node_revoked(&node) {
            tracing::warn!(node = node_shown, peer, "join refused: the node is revoked");
            return Err(Status::permission_denied(REVOKED_NODE));
        }
        match self.admit(token, node, csr_pem).await {
            Ok(cert_pem) => {
                tracing::info!(
                    node = node_shown,
                    peer,
                    lifetime_s = self.ca.node_cert_lifetime().as_secs(),
                    "node joined"
                );
                Ok(Response::new(JoinResponse {
                    cert_pem,
                    ca_pem: self.ca.cert_pem().into(),
                }))
            }
            Err(e) => {
                tracing::warn!(node = node_shown, peer, error = %e, "join refused");
                Err(e.into())
            }
        }
    }

    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        let peer = self.peer(&request)?;
        let ca = self.ca.clone();
        let csr = request.into_inner().csr_pem;
        let renewing = peer.clone();
        let signed = tokio::task::spawn_blocking(move || ca.renew_node(&renewing, &csr))
            .await
            .map_err(|_| Status::internal("renew task failed"))?;
        match signed {
            Ok(cert_pem) => {
                tracing::info!(node = peer.node, "node certificate renewed");
                Ok(Response::new(RenewResponse {
                    cert_pem,
                    ca_pem: self.ca.cert_pem().into(),
                }))
            }
            Err(e @ CaError::NodeMaxAge { .. }) => {
                tracing::warn!(node = peer.node, error = %e, "renewal refused");
                Err(Status::permission_denied(e.to_string()))
            }
            Err(e) => {
                tracing::warn!(node = peer.node, error = %e, "renewal refused");
                Err(Status::invalid_argument(e.to_string()))
            }
        }
    }

    async fn sign_workload(
        &self,
        request: Request<SignWorkloadRequest>,
    ) -> Result<Response<SignWorkloadResponse>, Status> {
        let peer = self.peer(&request)?;
        let SignWorkloadRequest { spiffe_id, csr_pem } = request.into_inner();
        let shown = limits::truncate(&spiffe_id, 200).to_owned();
        if !self.may_sign_workload(&peer.node) {
            tracing::warn!(
                node = peer.node,
                spiffe_id = shown,
                "workload certificate refused: the node asks for more than {} a second",
                limits::WORKLOAD_SIGNS_PER_SECOND
            );
            return Err(Status::resource_exhausted(format!(
                "node {} asks for too many workload certificates (at most {} a second, burst {}); retry later",
                peer.node,
                limits::WORKLOAD_SIGNS_PER_SECOND,
                limits::WORKLOAD_SIGN_BURST
            )));
        }
        if !self.hub.node_reported(&peer.node, &spiffe_id) {
            tracing::warn!(
                node = peer.node,
                spiffe_id = shown,
                "workload certificate refused: not a workload this node reported"
            );
            return Err(Status::permission_denied(format!(
                "node {} has not reported a workload with SPIFFE ID {shown:?}; report it first",
                peer.node
            )));
        }
        let ca = self.ca.clone();
        let signed = tokio::task::spawn_blocking(move || ca.sign_workload(&spiffe_id, &csr_pem))
            .await
            .map_err(|_| Status::internal("signing task failed"))?;
        match signed {
            Ok(signed) => {
                tracing::info!(
                    node = peer.node,
                    spiffe_id = shown,
                    serial = signed.serial,
                    lifetime_s = self.ca.workload_cert_lifetime().as_secs(),
                    "workload certificate signed"
                );
                let not_after_unix = signed
                    .not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                Ok(Response::new(SignWorkloadResponse {
                    cert_chain_pem: signed.cert_pem,
                    ca_pem: self.ca.cert_pem().into(),
                    not_after_unix,
                }))
            }
            Err(e) => {
                tracing::warn!(node = peer.node, spiffe_id = shown, error = %e, "workload certificate refused");
                Err(match e {
                    CaError::Csr(_) | CaError::WorkloadId { .. } => {
                        Status::invalid_argument(e.to_string())
                    }
                    _ => Status::internal("signing failed"),
                })
            }
        }
    }

    type StreamStream = ServerStream;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = self.peer(&request)?;
        let inbound = request.into_inner();
        let (out, rx) = mpsc::channel(4);
        let session = Session::new(self.hub.clone(), peer.clone(), out.clone());
        tokio::spawn(async move {
            let node = peer.node.clone();
            match session.run(inbound).await {
                Ok(()) => tracing::info!(node, "agent disconnected"),
                Err(status) => {
                    tracing::info!(node, code = ?status.code(), reason = status.message(), "stream ended");
                    let _ = out.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
