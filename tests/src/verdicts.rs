//! Verdict events in ward's JSON log.
//!
//! The exact field names are the agent's to choose; every alias this harness accepts is listed
//! in one place, [`FIELD_ALIASES`], so aligning them is a one-line change.

use serde_json::{Map, Value};

/// For each field a verdict line carries, the JSON keys accepted for it, preferred first.
pub const FIELD_ALIASES: &[(&str, &[&str])] = &[
    ("verdict", &["verdict"]),
    ("direction", &["direction", "dir"]),
    ("policy", &["policy", "policy_name"]),
    ("rule", &["rule", "rule_name"]),
    (
        "src",
        &[
            "src",
            "source",
            "src_id",
            "src_identity",
            "src_spiffe_id",
            "src_workload",
        ],
    ),
    (
        "dst",
        &[
            "dst",
            "destination",
            "dst_id",
            "dst_identity",
            "dst_spiffe_id",
            "dst_workload",
        ],
    ),
    (
        "dst_addr",
        &["dst_addr", "dst_ip", "daddr", "destination_addr"],
    ),
    ("dst_port", &["dst_port", "dport", "port"]),
    ("protocol", &["protocol", "proto"]),
    ("count", &["count"]),
];

/// One verdict event, fields as text (numbers rendered in decimal).
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    pub verdict: String,
    pub direction: Option<String>,
    pub policy: Option<String>,
    pub rule: Option<String>,
    pub src: Option<String>,
    pub dst: Option<String>,
    pub dst_addr: Option<String>,
    pub dst_port: Option<u16>,
    pub protocol: Option<String>,
    /// How many connections the line stands for (allowed flows are counted in the kernel and
    /// reported once per reading); 1 when the line does not say.
    pub count: u64,
    pub line: String,
}

/// What a test expects of a verdict line; `None` matches anything.
#[derive(Clone, Copy, Debug, Default)]
pub struct VerdictQuery<'a> {
    pub verdict: Option<&'a str>,
    pub direction: Option<&'a str>,
    pub policy: Option<&'a str>,
    pub rule: Option<&'a str>,
    /// A substring of the source identity (a SPIFFE ID or workload name).
    pub src: Option<&'a str>,
    /// A substring of the destination identity.
    pub dst: Option<&'a str>,
    pub dst_port: Option<u16>,
    pub protocol: Option<&'a str>,
}

impl VerdictQuery<'_> {
    pub fn matches(&self, verdict: &Verdict) -> bool {
        let same = |want: Option<&str>, got: &Option<String>| match (want, got) {
            (None, _) => true,
            (Some(want), Some(got)) => got.eq_ignore_ascii_case(want),
            (Some(_), None) => false,
        };
        let contains = |want: Option<&str>, got: &Option<String>| match (want, got) {
            (None, _) => true,
            (Some(want), Some(got)) => got.contains(want),
            (Some(_), None) => false,
        };
        self.verdict
            .is_none_or(|want| verdict.verdict.eq_ignore_ascii_case(want))
            && same(self.direction, &verdict.direction)
            && same(self.policy, &verdict.policy)
            && rule_matches(self.rule, verdict)
            && contains(self.src, &verdict.src)
            && contains(self.dst, &verdict.dst)
            && self
                .dst_port
                .is_none_or(|want| verdict.dst_port == Some(want))
            && same(self.protocol, &verdict.protocol)
    }
}

/// A rule may be logged bare (`allow-web`) or qualified by its policy (`web/allow-web`).
fn rule_matches(want: Option<&str>, verdict: &Verdict) -> bool {
    let Some(want) = want else { return true };
    let Some(rule) = &verdict.rule else {
        return false;
    };
    rule == want
        || rule
            .strip_suffix(want)
            .is_some_and(|head| head.ends_with('/') || head.ends_with(':') || head.ends_with('.'))
}

/// Every verdict event among `lines` (lines that are not JSON objects with a verdict are skipped).
pub fn parse_verdicts<S: AsRef<str>>(lines: &[S]) -> Vec<Verdict> {
    lines
        .iter()
        .filter_map(|line| parse_line(line.as_ref()))
        .collect()
}

/// The first verdict event among `lines` that `query` matches.
pub fn find_verdict<S: AsRef<str>>(lines: &[S], query: &VerdictQuery<'_>) -> Option<Verdict> {
    parse_verdicts(lines).into_iter().find(|v| query.matches(v))
}

fn parse_line(line: &str) -> Option<Verdict> {
    let start = line.find('{')?;
    let Value::Object(object) = serde_json::from_str::<Value>(&line[start..]).ok()? else {
        return None;
    };
    let fields = flatten(&object);
    let get = |name: &str| -> Option<String> {
        let (_, keys) = FIELD_ALIASES.iter().find(|(field, _)| *field == name)?;
        keys.iter().find_map(|key| {
            fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        })
    };
    Some(Verdict {
        verdict: get("verdict")?,
        direction: get("direction"),
        policy: get("policy"),
        rule: get("rule"),
        src: get("src"),
        dst: get("dst"),
        dst_addr: get("dst_addr"),
        dst_port: get("dst_port").and_then(|port| port.parse().ok()),
        protocol: get("protocol"),
        count: get("count").and_then(|n| n.parse().ok()).unwrap_or(1),
        line: line.to_owned(),
    })
}

/// Top-level keys first, then those of nested objects (tracing puts event fields in `fields`).
fn flatten(object: &Map<String, Value>) -> Vec<(String, String)> {
    let scalar = |value: &Value| match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    };
    let mut fields: Vec<(String, String)> = object
        .iter()
        .filter_map(|(key, value)| Some((key.clone(), scalar(value)?)))
        .collect();
    for value in object.values() {
        if let Value::Object(inner) = value {
            fields.extend(
                inner
                    .iter()
                    .filter_map(|(key, value)| Some((key.clone(), scalar(value)?))),
            );
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_flat_and_tracing_nested_verdicts() {
        let lines = [
            r#"{"level":"INFO","fields":{"message":"ready"}}"#,
            r#"{"timestamp":"t","fields":{"verdict":"deny","direction":"egress","policy":"p","rule":"p/block","src":"spiffe://t/workload/client","dst_port":8080,"protocol":"tcp"}}"#,
            r#"{"verdict":"ALLOW","policy":"p","rule":"open","dst_port":"9090","proto":"TCP"}"#,
        ];
        let deny = find_verdict(
            &lines,
            &VerdictQuery {
                verdict: Some("deny"),
                rule: Some("block"),
                src: Some("workload/client"),
                dst_port: Some(8080),
                ..Default::default()
            },
        )
        .expect("the deny line");
        assert_eq!(deny.direction.as_deref(), Some("egress"));
        let allow = find_verdict(
            &lines,
            &VerdictQuery {
                verdict: Some("allow"),
                protocol: Some("tcp"),
                dst_port: Some(9090),
                ..Default::default()
            },
        );
        assert!(allow.is_some(), "the allow line");
        let wrong_rule = VerdictQuery {
            rule: Some("lock"),
            ..Default::default()
        };
        assert!(
            find_verdict(&lines, &wrong_rule).is_none(),
            "`lock` is not `p/block`"
        );
    }
}
