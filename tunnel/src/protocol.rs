//! What the two agents say to each other inside the TLS session (see `docs/mtls.md`): one
//! HTTP/2 `CONNECT <ip>:<port>` stream per tunneled connection; `200` opens it, any other status
//! refuses it and names the reason in [`REASON_HEADER`].
use std::net::SocketAddr;

use http::{Method, Request, StatusCode};

/// The response header that carries a refusal's reason, for the source agent's verdict event.
pub const REASON_HEADER: &str = "ward-reason";

/// The request header that names the source workload's numeric identity. The certificate proves
/// the SPIFFE ID; one SPIFFE ID may have several identities (the pods of one service account
/// with different labels), and the source agent, which holds that ID's key and whose kernel
/// tagged the connection, says which one connects. The destination agent accepts only an
/// identity of the certificate's SPIFFE ID.
pub const SOURCE_IDENTITY_HEADER: &str = "ward-source-identity";

/// The CONNECT request for the original destination `destination`, from the workload of
/// identity `source_identity`.
pub fn connect_request(destination: SocketAddr, source_identity: u32) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(destination.to_string())
        .header(SOURCE_IDENTITY_HEADER, source_identity)
        .body(())
        .expect("an address is a valid CONNECT authority")
}

/// The source identity a CONNECT request names: `None` when it names none (an agent from before
/// the header), an error when the header is not a number.
pub fn source_identity_of<B>(request: &Request<B>) -> Result<Option<u32>, String> {
    let Some(value) = request.headers().get(SOURCE_IDENTITY_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map(Some)
        .ok_or_else(|| format!("{SOURCE_IDENTITY_HEADER} {value:?} is not a number"))
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
