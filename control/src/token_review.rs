//! Agents on Kubernetes join with their pod's service account token instead of a one-time join
//! token (`ward-control --kubernetes`): the DaemonSet projects a token for the audience
//! [`AUDIENCE`] into each agent's pod, and ward-control asks the API server (a `TokenReview`)
//! whose it is. The join is admitted when the token is valid for that audience, belongs to the
//! agents' service account, and names the node the agent joins as: Kubernetes 1.30 and later put
//! the pod's node into a projected token ([`NODE_NAME_EXTRA`]), so an agent's token cannot join as
//! another node. New nodes (an autoscaler's) join with nothing placed on them by hand.
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{api::PostParams, Api, Client};

/// The audience the DaemonSet's projected token is issued for; a token for the API server (or for
/// anything else) is refused.
pub const AUDIENCE: &str = "ward-control";
/// The extra field of a projected token's user that names its pod's node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReviewError {
    #[error(
        "the Kubernetes API does not accept the service account token for audience {AUDIENCE:?}{0}"
    )]
    NotAuthenticated(String),
    #[error("the token is {got:?}'s, not the agents' service account {want:?}")]
    WrongAccount { got: String, want: String },
    #[error(
        "the token names no node (Kubernetes 1.30 and later bind a projected token to its pod's node); join with a join token instead"
    )]
    NoNode,
    #[error("the token's pod runs on node {bound:?}")]
    WrongNode { bound: String },
    #[error("asking the Kubernetes API to review the token: {0}")]
    Api(String),
}

/// Whether `token` is a JSON Web Token (three base64url parts), as service account tokens are;
/// join tokens are hex.
pub fn is_service_account_token(token: &str) -> bool {
    let parts: Vec<&str> = token.trim().split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Reviews agents' tokens with the cluster's API server.
pub struct TokenReviewer {
    client: Client,
    /// `system:serviceaccount:<namespace>:<name>`.
    account: String,
}

impl TokenReviewer {
    /// `account` is the agents' service account as `<namespace>/<name>`.
    pub fn new(client: Client, account: &str) -> Self {
        let (namespace, name) = account.split_once('/').unwrap_or(("default", account));
        TokenReviewer {
            client,
            account: format!("system:serviceaccount:{namespace}:{name}"),
        }
    }

    /// Admits `token` for joining as `node`, or says why not.
    pub async fn review(&self, token: &str, node: &str) -> Result<(), ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.trim().to_owned(),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ReviewError::Api(e.to_string()))?;
        check(&reviewed.status.unwrap_or_default(), &self.account, node)
    }
}

/// The decision on a review's answer, apart from the asking.
fn check(status: &TokenReviewStatus, account: &str, node: &str) -> Result<(), ReviewError> {
    let audience_ok = status
        .audiences
        .as_ref()
        .is_none_or(|a| a.iter().any(|a| a == AUDIENCE));
    if status.authenticated != Some(true) || !audience_ok {
        let why = status.error.as_deref().map_or_else(String::new, |e| {
            format!(": {}", crate::limits::truncate(e, 200))
        });
        return Err(ReviewError::NotAuthenticated(why));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    if username != account {
        return Err(ReviewError::WrongAccount {
            got: crate::limits::truncate(&username, 200).to_owned(),
            want: account.to_owned(),
        });
    }
    let nodes = user
        .extra
        .as_ref()
        .and_then(|extra| extra.get(NODE_NAME_EXTRA))
        .cloned()
        .unwrap_or_default();
    match nodes.as_slice() {
        [bound] if bound == node => Ok(()),
        [bound] => Err(ReviewError::WrongNode {
            bound: crate::limits::truncate(bound, 253).to_owned(),
        }),
        _ => Err(ReviewError::NoNode),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    const ACCOUNT: &str = "system:serviceaccount:ward-system:ward";

    fn status(username: &str, node: Option<&str>) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec![AUDIENCE.into()]),
            user: Some(UserInfo {
                username: Some(username.into()),
                extra: node.map(|n| [(NODE_NAME_EXTRA.to_string(), vec![n.to_string()])].into()),
                ..UserInfo::default()
            }),
            ..TokenReviewStatus::default()
        }
    }

    #[test]
    fn the_agents_token_joins_only_as_its_own_node() {
        assert_eq!(check(&status(ACCOUNT, Some("a")), ACCOUNT, "a"), Ok(()));
        assert_eq!(
            check(&status(ACCOUNT, Some("a")), ACCOUNT, "b"),
            Err(ReviewError::WrongNode { bound: "a".into() })
        );
        assert_eq!(
            check(&status(ACCOUNT, None), ACCOUNT, "a"),
            Err(ReviewError::NoNode)
        );
        let other = "system:serviceaccount:default:default";
        assert!(matches!(
            check(&status(other, Some("a")), ACCOUNT, "a"),
            Err(ReviewError::WrongAccount { .. })
        ));
    }

    #[test]
    fn an_unauthenticated_token_or_another_audience_is_refused_with_the_apis_reason() {
        let mut refused = status(ACCOUNT, Some("a"));
        refused.authenticated = Some(false);
        refused.error = Some("token has expired".into());
        assert_eq!(
            check(&refused, ACCOUNT, "a"),
            Err(ReviewError::NotAuthenticated(": token has expired".into()))
        );
        let mut elsewhere = status(ACCOUNT, Some("a"));
        elsewhere.audiences = Some(vec!["https://kubernetes.default.svc".into()]);
        assert!(matches!(
            check(&elsewhere, ACCOUNT, "a"),
            Err(ReviewError::NotAuthenticated(_))
        ));
    }

    #[test]
    fn service_account_tokens_are_told_from_join_tokens() {
        assert!(is_service_account_token(
            "eyJhbGciOi.eyJhdWQiOlsid2FyZCJd.c2ln-_x"
        ));
        assert!(!is_service_account_token(&crate::tokens::generate()));
        assert!(!is_service_account_token("a..b"));
        assert!(!is_service_account_token("a.b.c d"));
    }
}
