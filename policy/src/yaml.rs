//! YAML as ward reads it: YAML 1.2 scalars (`yes`, `no`, `on` are strings, not booleans), typed
//! values through serde, a tree of nodes that keeps the line of each, and errors that name their
//! line. The policy loader, the agent's configuration and the tests all read YAML through here.

use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Unexpected, Visitor};
use serde_saphyr::{DefaultMessageFormatter, MessageFormatter, Spanned};

use crate::diagnostics::{FieldPath, Segment};

/// A YAML error: what is wrong, the field it is about (empty for the document as a whole, e.g. a
/// syntax error) and, when known, where (1-based, within the text parsed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub path: FieldPath,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(column)) => write!(f, "line {line} column {column}: ")?,
            (Some(line), None) => write!(f, "line {line}: ")?,
            _ => {}
        }
        if !self.path.segments().is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// The options of every parse: YAML 1.2 booleans; an empty or `null` value read as a string is
/// that text, as YAML 1.1 parsers did; no limit on the size of a document (a policy of 10,000
/// rules is one document), but the default limits on nesting and alias expansion.
fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        null_as_string: true,
        with_snippet: false,
        budget: serde_saphyr::budget! {
            max_events: usize::MAX,
            max_nodes: usize::MAX,
        },
    }
}

/// A typed value of one YAML document; an error names the field it is about.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    serde_saphyr::from_str_with_options(text, options())
        .map_err(|e| explain(&e, parse(text).ok().as_ref()))
}

/// The tree of one YAML document, each node with its position.
pub fn parse(text: &str) -> Result<Node, Error> {
    serde_saphyr::from_str_with_options(text, options()).map_err(|e| explain(&e, None))
}

/// [`from_str`] for a document already parsed into `tree`, which explains the errors.
pub fn typed<T: DeserializeOwned>(text: &str, tree: &Node) -> Result<T, Error> {
    serde_saphyr::from_str_with_options(text, options()).map_err(|e| explain(&e, Some(tree)))
}

/// `e` with the field it is about and the value found there, from `tree`: the node at the error's
/// position.
fn explain(e: &serde_saphyr::Error, tree: Option<&Node>) -> Error {
    let found = position(e)
        .zip(tree)
        .and_then(|(at, tree)| tree.path_at(at, FieldPath::default()));
    let (path, node) = found.unzip();
    let mut error = error(e, node);
    error.path = path.unwrap_or_default();
    error
}

fn position(e: &serde_saphyr::Error) -> Option<(usize, usize)> {
    let location = e.location().filter(|l| l.line() > 0)?;
    Some((location.line() as usize, location.column() as usize))
}

/// `e` in serde's words where serde-saphyr has shorter ones of its own: a type mismatch names
/// the value found (from `node`, the node the error points at) and the type expected.
fn error(e: &serde_saphyr::Error, node: Option<&Node>) -> Error {
    let e = e.without_snippet();
    let (line, column) = position(e).unzip();
    let found = node.map(|node| node.value.unexpected().to_string());
    let message = match (e, found) {
        (serde_saphyr::Error::InvalidScalar { ty, .. }, Some(found)) => {
            format!("invalid type: {found}, expected {}", article(ty))
        }
        (serde_saphyr::Error::Unexpected { expected, .. }, Some(found)) => {
            let expected = expected
                .trim_end_matches(" start")
                .trim_end_matches(" scalar");
            format!("invalid type: {found}, expected {}", article(expected))
        }
        _ => DefaultMessageFormatter.format_message(e).into_owned(),
    };
    Error {
        path: FieldPath::default(),
        line,
        column,
        message,
    }
}

/// `a sequence`, `a string`, `u16`: serde names types without an article, kinds with one.
fn article(what: &str) -> String {
    match what {
        "sequence" | "mapping" | "string" | "boolean" => format!("a {what}"),
        "map" => "a map".into(),
        other => other.into(),
    }
}

/// A node of a YAML document and where it starts (1-based line and column of the text parsed;
/// an alias is where it is used).
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub line: usize,
    pub column: usize,
    pub value: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Keys and values in document order.
    Map(Vec<(Node, Node)>),
}

impl Value {
    fn unexpected(&self) -> Unexpected<'_> {
        match self {
            Value::Null => Unexpected::Unit,
            Value::Bool(b) => Unexpected::Bool(*b),
            Value::Int(i) => Unexpected::Signed(*i),
            Value::UInt(u) => Unexpected::Unsigned(*u),
            Value::Float(f) => Unexpected::Float(*f),
            Value::Str(s) => Unexpected::Str(s),
            Value::Seq(_) => Unexpected::Seq,
            Value::Map(_) => Unexpected::Map,
        }
    }
}

impl Node {
    /// The value of `key` when this is a mapping that has it.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The line of the field at `path`. A path that ends at a key gives the key's own line (a
    /// block value starts below its key); one that ends at an index gives the element's.
    pub fn line_of(&self, path: &FieldPath) -> Option<usize> {
        let mut node = self;
        let mut line = node.line;
        for segment in path.segments() {
            (line, node) = match (segment, &node.value) {
                (Segment::Key(want), Value::Map(entries)) => entries
                    .iter()
                    .find(|(k, _)| k.as_str() == Some(want))
                    .map(|(k, v)| (k.line, v))?,
                (Segment::Index(i), Value::Seq(items)) => items.get(*i).map(|v| (v.line, v))?,
                _ => return None,
            };
        }
        Some(line)
    }

    /// The field an error at `at` is about, and the node there: a value is its own field; a key
    /// is about the mapping that holds it (an unknown or missing field is the mapping's error).
    fn path_at(&self, at: (usize, usize), path: FieldPath) -> Option<(FieldPath, &Node)> {
        if (self.line, self.column) == at {
            return Some((path, self));
        }
        match &self.value {
            Value::Map(entries) => entries.iter().find_map(|(k, v)| {
                if (k.line, k.column) == at {
                    return Some((path.clone(), self));
                }
                let key = k.as_str()?;
                v.path_at(at, path.key(key))
            }),
            Value::Seq(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, item)| item.path_at(at, path.index(i))),
            _ => None,
        }
    }
}

impl<'de> de::Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Node, D::Error> {
        let spanned = Spanned::<Value>::deserialize(deserializer)?;
        Ok(Node {
            line: spanned.referenced.line() as usize,
            column: spanned.referenced.column() as usize,
            value: spanned.value,
        })
    }
}

impl<'de> de::Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        de::Deserialize::deserialize(deserializer)
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<Value, E> {
        Ok(Value::Int(i))
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Value, E> {
        Ok(Value::UInt(u))
    }

    fn visit_i128<E: de::Error>(self, i: i128) -> Result<Value, E> {
        Ok(Value::Str(i.to_string()))
    }

    fn visit_u128<E: de::Error>(self, u: u128) -> Result<Value, E> {
        Ok(Value::Str(u.to_string()))
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Value, E> {
        Ok(Value::Float(f))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        Ok(Value::Str(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        Ok(Value::Str(s))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(key) = map.next_key()? {
            entries.push((key, map.next_value()?));
        }
        Ok(Value::Map(entries))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn yaml_1_1_booleans_are_strings() {
        let labels: BTreeMap<String, String> =
            from_str("a: yes\nb: no\nc: on\nd: off\ne: y\nf: true\n").expect("labels parse");
        let values: Vec<&str> = labels.values().map(String::as_str).collect();
        assert_eq!(values, ["yes", "no", "on", "off", "y", "true"]);
        let tree = parse("yes: on\nno: true\n").expect("parses");
        assert_eq!(tree.get("yes").and_then(Node::as_str), Some("on"));
        assert_eq!(tree.get("no").map(|n| &n.value), Some(&Value::Bool(true)));
        let e = from_str::<bool>("yes\n").expect_err("yes is no boolean");
        assert_eq!(e.line, Some(1), "{e}");
    }

    #[test]
    fn nodes_keep_their_lines() {
        let text = "a:\n  b: [1,\n    2]\n  c:\n    - x: 1\n      y: &v z\n    - *v\n";
        let tree = parse(text).expect("parses");
        let path = FieldPath::default().key("a");
        let line = |path: &FieldPath| tree.line_of(path);
        assert_eq!(line(&path), Some(1));
        assert_eq!(line(&path.key("b").index(1)), Some(3));
        assert_eq!(line(&path.key("c")), Some(4), "a key is on its own line");
        assert_eq!(line(&path.key("c").index(0).key("y")), Some(6));
        assert_eq!(
            line(&path.key("c").index(1)),
            Some(7),
            "an alias is where it is used"
        );
        assert_eq!(line(&path.key("c").index(2)), None);
        assert_eq!(line(&path.key("zzz")), None);
    }

    #[test]
    fn type_errors_name_the_field_and_the_value_found() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Doc {
            a: Vec<Inner>,
        }
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Inner {
            port: Option<u16>,
            names: Option<Vec<String>>,
        }
        let cases = [
            (
                "a:\n  - port: http\n",
                "a[0].port",
                2,
                "invalid type: string \"http\", expected u16",
            ),
            (
                "a:\n  - names: {x: 1}\n",
                "a[0].names",
                2,
                "invalid type: map, expected a sequence",
            ),
            (
                "a:\n  - port: 1\n    bogus: 2\n",
                "a[0]",
                3,
                "unknown field `bogus`",
            ),
            (
                "a: [{port: 1}, {names: [[x]]}]\n",
                "a[1].names[0]",
                1,
                "invalid type: sequence, expected a string",
            ),
        ];
        for (text, field, line, message) in cases {
            let tree = parse(text).expect("parses");
            let e = typed::<Doc>(text, &tree).expect_err(text);
            assert_eq!(e, from_str::<Doc>(text).expect_err(text), "one explanation");
            assert_eq!(
                (e.path.to_string().as_str(), e.line),
                (field, Some(line)),
                "{text:?}: {e:?}"
            );
            assert!(e.message.starts_with(message), "{text:?}: {e:?}");
        }
    }

    #[test]
    fn syntax_errors_name_their_line() {
        let e = parse("a: 1\nb: [x\n").expect_err("unclosed");
        assert!(e.line.is_some_and(|l| l >= 2), "{e}");
        assert!(e.to_string().starts_with("line "), "{e}");
    }
}
