//! ward's control-plane protocol (`proto/ward/control/v1/control.proto`) and the tonic/prost code
//! generated from it.

#[allow(clippy::all, clippy::pedantic, reason = "generated code")]
pub mod v1 {
    tonic::include_proto!("ward.control.v1");
}

pub use v1::*;

impl ResourceType {
    /// Every type the control plane serves, in the order the agent applies them.
    pub const ALL: [ResourceType; 6] = [
        ResourceType::TrustBundle,
        ResourceType::Identity,
        ResourceType::Ipcache,
        ResourceType::Workload,
        ResourceType::Service,
        ResourceType::Policy,
    ];

    /// The short name used in logs, state files and `RemoteState::versions`.
    pub fn short_name(self) -> &'static str {
        match self {
            ResourceType::Unspecified => "unspecified",
            ResourceType::Policy => "policy",
            ResourceType::Identity => "identity",
            ResourceType::Ipcache => "ipcache",
            ResourceType::TrustBundle => "trust_bundle",
            ResourceType::Workload => "workload",
            ResourceType::Service => "service",
        }
    }

    pub fn from_short_name(name: &str) -> Option<ResourceType> {
        Self::ALL.into_iter().find(|t| t.short_name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn short_names_round_trip() {
        for t in ResourceType::ALL {
            assert_eq!(
                ResourceType::from_short_name(t.short_name()),
                Some(t),
                "{t:?}"
            );
        }
        assert_eq!(ResourceType::from_short_name("unspecified"), None);
    }

    #[test]
    fn messages_round_trip_through_the_wire_format() {
        let msg = ServerMessage {
            updates: vec![Update {
                r#type: ResourceType::Policy as i32,
                version: "v2".into(),
                nonce: "1".into(),
                base_version: "v1".into(),
                replace: false,
                resources: vec![Resource {
                    name: "web".into(),
                    body: Some(resource::Body::Policy(Policy {
                        yaml: "kind: Policy".into(),
                        source: "web.yaml#1".into(),
                    })),
                }],
                removed: vec!["old".into()],
            }],
            more: false,
        };
        let decoded = ServerMessage::decode(msg.encode_to_vec().as_slice())
            .expect("a message decodes from its own encoding");
        assert_eq!(decoded, msg);
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        let garbage = [0xffu8, 0xff, 0xff, 0xff, 0x0f, 0x12, 0x80];
        assert!(AgentMessage::decode(garbage.as_slice()).is_err());
    }
}
