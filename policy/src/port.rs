//! A port as policy names it: a protocol and a port, or an ICMP message type.

use std::str::FromStr;

use agent_common::{
    icmp_type_port, ICMP_TYPE_PORT_BASE, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};

use crate::protocol_name;

/// `--port 8080/tcp`, or `--port 8/icmp` for an ICMP message type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortArg {
    pub protocol: u8,
    /// The port of the policy-map key: the port, or for ICMP and ICMPv6
    /// [`icmp_type_port`] of the message type.
    pub port: u16,
}

impl PortArg {
    /// The ICMP or ICMPv6 message type, for those protocols.
    pub fn icmp_type(&self) -> Option<u8> {
        icmp_type_of(self.protocol, self.port)
    }
}

/// The message type an ICMP or ICMPv6 key port stands for.
pub fn icmp_type_of(protocol: u8, port: u16) -> Option<u8> {
    if protocol != PROTO_ICMP && protocol != PROTO_ICMPV6 {
        return None;
    }
    port.checked_sub(ICMP_TYPE_PORT_BASE)
        .and_then(|t| u8::try_from(t).ok())
}

impl FromStr for PortArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (number, protocol) = text.split_once('/').unwrap_or((text, "tcp"));
        let protocol = match protocol.to_ascii_lowercase().as_str() {
            "tcp" => PROTO_TCP,
            "udp" => PROTO_UDP,
            "sctp" => PROTO_SCTP,
            "icmp" => PROTO_ICMP,
            "icmpv6" => PROTO_ICMPV6,
            other => {
                return Err(format!(
                    "protocol `{other}` is not tcp, udp, sctp, icmp or icmpv6"
                ))
            }
        };
        if protocol == PROTO_ICMP || protocol == PROTO_ICMPV6 {
            return match number.parse::<u8>() {
                Ok(icmp_type) => Ok(PortArg {
                    protocol,
                    port: icmp_type_port(icmp_type),
                }),
                Err(_) => Err(format!(
                    "ICMP type `{number}` is not a number from 0 to 255"
                )),
            };
        }
        match number.parse::<u16>() {
            Ok(port) if port != 0 => Ok(PortArg { protocol, port }),
            _ => Err(format!("port `{number}` is not a number from 1 to 65535")),
        }
    }
}

impl std::fmt::Display for PortArg {
    /// `tcp/8080`, or `icmp type 8`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let protocol = protocol_name(self.protocol);
        match self.icmp_type() {
            Some(icmp_type) => write!(f, "{protocol} type {icmp_type}"),
            None => write!(f, "{protocol}/{}", self.port),
        }
    }
}
