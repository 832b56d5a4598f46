//! What the two agents say to each other inside the TLS session (see `docs/mtls.md`): one
//! HTTP/2 `CONNECT <ip>:<port>` stream per tunneled connection; `200` opens it, any other status
//! refuses it and names the reason in [`REASON_HEADER`].
use std::net::SocketAddr;

use http::{Method, Request, StatusCode};

/// The response header that carries a refusal's reason, for the source agent's verdict event.
pub const REASON_HEADER: &str = "ward-reason";

/// The CONNECT request for the original destination `destination`.
pub fn connect_request(destination: SocketAddr) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(destination.to_string())
        .body(())
        .expect("an address is a valid CONNECT authority")
}

/// The original destination a CONNECT request names.
pub fn destination_of<B>(request: &Request<B>) -> Result<SocketAddr, String> {
    if request.method() != Method::CONNECT {
        return Err(format!(
            "method {} (only CONNECT is served)",
            request.method()
        ));
    }
    let authority = request
        .uri()
        .authority()
        .ok_or_else(|| "CONNECT without an authority".to_string())?;
    authority
        .as_str()
        .parse::<SocketAddr>()
        .map_err(|_| format!("authority {:?} is not <ip>:<port>", authority.as_str()))
}

/// Reasons travel in a header: keep them to visible ASCII and short.
pub fn header_safe(reason: &str) -> String {
    reason
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(512)
        .collect()
}

pub const OK: StatusCode = StatusCode::OK;
