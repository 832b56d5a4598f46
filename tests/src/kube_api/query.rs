//! A request's query string, and the label and field selectors the stand-in understands.

use std::collections::BTreeMap;

use serde_json::Value;

/// The query parameters, percent-decoded; a parameter given twice keeps its last value.
pub(super) fn parse(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(pair), String::new()),
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One requirement of an equality-based selector.
#[derive(Debug)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// The `labelSelector` and `fieldSelector` of a list or watch: equality-based requirements only
/// (`k=v`, `k==v`, `k!=v`, and for labels `k`, `!k`); set-based ones (`k in (a,b)`) are refused
/// with `400` so a test using them fails instead of seeing every object.
#[derive(Debug, Default)]
pub(super) struct Selectors {
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

impl Selectors {
    pub fn from_query(query: &BTreeMap<String, String>) -> Result<Selectors, String> {
        let parse_all = |name: &str, labels: bool| -> Result<Vec<Requirement>, String> {
            let Some(text) = query.get(name) else {
                return Ok(Vec::new());
            };
            text.split(',')
                .filter(|r| !r.trim().is_empty())
                .map(|r| {
                    requirement(r.trim(), labels)
                        .ok_or_else(|| format!("{name}: unsupported requirement {r:?}"))
                })
                .collect()
        };
        Ok(Selectors {
            labels: parse_all("labelSelector", true)?,
            fields: parse_all("fieldSelector", false)?,
        })
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.labels
            .iter()
            .all(|r| r.holds(|key| labels[key].as_str().map(str::to_owned)))
            && self
                .fields
                .iter()
                .all(|r| r.holds(|path| field(object, path)))
    }
}

fn requirement(text: &str, labels: bool) -> Option<Requirement> {
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    let pair = |k: &str, v: &str| {
        (valid(k) && (v.is_empty() || valid(v))).then(|| (k.to_owned(), v.to_owned()))
    };
    if let Some((k, v)) = text.split_once("!=") {
        return pair(k.trim(), v.trim()).map(|(k, v)| Requirement::NotEquals(k, v));
    }
    if let Some((k, v)) = text.split_once("==").or_else(|| text.split_once('=')) {
        return pair(k.trim(), v.trim()).map(|(k, v)| Requirement::Equals(k, v));
    }
    match text.strip_prefix('!') {
        Some(k) if labels && valid(k) => Some(Requirement::NotExists(k.to_owned())),
        None if labels && valid(text) => Some(Requirement::Exists(text.to_owned())),
        _ => None,
    }
}

impl Requirement {
    fn holds(&self, value_of: impl Fn(&str) -> Option<String>) -> bool {
        match self {
            Requirement::Equals(k, v) => value_of(k).as_deref() == Some(v),
            Requirement::NotEquals(k, v) => value_of(k).as_deref() != Some(v),
            Requirement::Exists(k) => value_of(k).is_some(),
            Requirement::NotExists(k) => value_of(k).is_none(),
        }
    }
}

/// The field at a dotted path (`spec.nodeName`) as the API server compares it: a string, or the
/// empty string where the field is absent.
fn field(object: &Value, path: &str) -> Option<String> {
    let value = path.split('.').fold(object, |v, key| &v[key]);
    Some(match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn selectors(query: &str) -> Selectors {
        Selectors::from_query(&parse(query)).expect("a supported selector")
    }

    #[test]
    fn equality_selectors_pick_objects() {
        let pod = json!({"metadata": {"name": "p", "labels": {"app": "web"}}, "spec": {"nodeName": "n1"}});
        assert!(
            selectors("labelSelector=app%3Dweb&fieldSelector=spec.nodeName%3Dn1").matches(&pod)
        );
        assert!(selectors("labelSelector=app,!tier&limit=500").matches(&pod));
        assert!(!selectors("labelSelector=app!%3Dweb").matches(&pod));
        assert!(!selectors("fieldSelector=spec.nodeName==n2").matches(&pod));
        assert!(selectors("fieldSelector=metadata.namespace%3D").matches(&pod));
    }

    #[test]
    fn set_based_selectors_are_refused() {
        let query = parse("labelSelector=app+in+(web,db)");
        assert!(Selectors::from_query(&query).is_err());
    }
}
