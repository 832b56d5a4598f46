//! ward's mTLS tunnel: the user-space data path that carries a workload's connection from its
//! node's agent to the destination node's agent over TLS 1.3, presenting both workloads' X.509
//! SVIDs, as HTTP/2 CONNECT streams (one TLS session carries many connections, as Istio's
//! HBONE does). `docs/mtls.md` describes the protocol.
//!
//! - [`svid`]: this node's workload certificates, replaced at runtime; [`renewal`] keeps each
//!   fresh (signed by the control plane, renewed at half its lifetime).
//! - [`trust`]: trust bundle, revocations, trust domain, and the rustls verifiers.
//! - [`outbound`]: carries an accepted local connection to the peer agent (pooled sessions).
//! - [`inbound`]: the listener that verifies, authorizes and connects to the local workload.
pub mod identity;
pub mod inbound;
/// The load generator and servers of the tunnel benchmarks (`tunnel/benches/tunnel.rs`,
/// `tests/benches/mtls.rs`).
#[cfg(feature = "testing")]
pub mod load;
pub mod outbound;
pub mod protocol;
pub mod renewal;
mod splice;
pub mod svid;
#[cfg(any(test, feature = "testing"))]
pub mod test_helpers;
pub mod tls;
pub mod trust;

pub use identity::{IdentityError, Serial, SpiffeId};
pub use inbound::{
    Authorizer, DeliveryFuture, Denied, Inbound, InboundConfig, InboundEvent, Presenting, Refusal,
    Verdict,
};
pub use outbound::{
    OriginalDestinations, Outbound, OutboundConfig, OutboundRequest, OutboundStats, TunnelError,
};
pub use splice::Copied;
pub use svid::{server_name_for, Svid, SvidStore};
pub use trust::{TrustError, TrustStore};
