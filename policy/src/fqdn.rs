//! DNS-name peers of egress rules: `fqdn` (one name) and `fqdnPattern` (names of a shape), their
//! validation, and how a name the agent's DNS proxy saw in an answer is matched against them.
//!
//! Names are compared in one form ([`normalize`]): ASCII lowercase, without the final dot. In a
//! pattern, `*` stands for one or more of `[a-z0-9_-]` inside one label, so `*.example.com`
//! matches `a.example.com` but neither `example.com` nor `a.b.example.com`; a pattern that is only
//! `*` matches every name.

use std::fmt;

/// The longest name, in presentation form without the final dot.
const MAX_NAME: usize = agent_common::MAX_DNS_NAME;
/// The longest label.
const MAX_LABEL: usize = 63;

/// A DNS-name peer: what an address learned from a name is decided as.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FqdnSelector {
    /// `fqdn`: exactly this name (normalized).
    Name(String),
    /// `fqdnPattern`: the names this pattern (normalized) matches.
    Pattern(String),
}

/// The form names are compared in: ASCII lowercase, one trailing dot removed.
pub fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Whether `c` may appear in a label of a name.
fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'
}

impl FqdnSelector {
    /// An `fqdn` peer as written, or why it is refused.
    pub fn parse_name(text: &str) -> Result<FqdnSelector, String> {
        validated(text, false).map(FqdnSelector::Name)
    }

    /// An `fqdnPattern` peer as written, or why it is refused.
    pub fn parse_pattern(text: &str) -> Result<FqdnSelector, String> {
        validated(text, true).map(FqdnSelector::Pattern)
    }

    /// The name or pattern, normalized.
    pub fn text(&self) -> &str {
        match self {
            FqdnSelector::Name(text) | FqdnSelector::Pattern(text) => text,
        }
    }

    /// Whether this is the pattern `*`, which every name matches.
    pub fn matches_every_name(&self) -> bool {
        matches!(self, FqdnSelector::Pattern(p) if p == "*")
    }

    /// Whether `name`, [normalized](normalize), is one this selector names.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            FqdnSelector::Name(want) => want == name,
            FqdnSelector::Pattern(_) if self.matches_every_name() => !name.is_empty(),
            FqdnSelector::Pattern(pattern) => {
                let (mut patterns, mut labels) = (pattern.split('.'), name.split('.'));
                loop {
                    match (patterns.next(), labels.next()) {
                        (None, None) => return true,
                        (Some(p), Some(l)) if label_matches(p.as_bytes(), l.as_bytes()) => {}
                        _ => return false,
                    }
                }
            }
        }
    }
}

/// Whether one label of a name matches one label of a pattern, each `*` standing for one or more
/// name characters. Pattern labels hold only name characters and `*`, so a label with any other
/// character matches none. In time of the product of the two lengths, whatever the number of `*`.
fn label_matches(pattern: &[u8], label: &[u8]) -> bool {
    if !label.iter().all(|b| is_name_char(char::from(*b))) {
        return false;
    }
    // matched[j]: whether the pattern read so far matches `label[..j]`.
    let mut matched = vec![false; label.len() + 1];
    matched[0] = true;
    for &p in pattern {
        let mut next = vec![false; label.len() + 1];
        for j in 1..=label.len() {
            next[j] = if p == b'*' {
                // label[j - 1] is this star's first character, or one more of it.
                matched[j - 1] || next[j - 1]
            } else {
                matched[j - 1] && label[j - 1] == p
            };
        }
        matched = next;
    }
    matched[label.len()]
}

/// `text` normalized, if it is a valid name (or pattern, with `*`).
fn validated(text: &str, pattern: bool) -> Result<String, String> {
    let name = normalize(text);
    if name.is_empty() {
        return Err("an empty DNS name".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "`{text}` is {} characters long; a DNS name has at most {MAX_NAME}",
            name.len()
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!("`{text}` has an empty label"));
        }
        if label.len() > MAX_LABEL {
            return Err(format!(
                "`{text}`: label `{label}` is {} characters long; a label has at most {MAX_LABEL}",
                label.len()
            ));
        }
    }
    let allowed = |c: char| is_name_char(c) || c == '.' || (pattern && c == '*');
    if let Some(c) = name.chars().find(|c| !allowed(*c)) {
        let reason = match c {
            '*' => "`*` belongs in an fqdnPattern".to_owned(),
            c if !c.is_ascii() => {
                format!("`{c}` is not ASCII: write an internationalized name in its `xn--` form")
            }
            c => format!(
                "`{c}` is not allowed: a name holds letters, digits, `-` and `_`{}",
                if pattern { " (and `*`)" } else { "" }
            ),
        };
        return Err(format!("`{text}`: {reason}"));
    }
    Ok(name)
}

/// The YAML form: `fqdn:<name>` or `fqdnPattern:<pattern>`.
impl fmt::Display for FqdnSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FqdnSelector::Name(name) => write!(f, "fqdn:{name}"),
            FqdnSelector::Pattern(pattern) => write!(f, "fqdnPattern:{pattern}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> FqdnSelector {
        FqdnSelector::parse_name(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn pattern(text: &str) -> FqdnSelector {
        FqdnSelector::parse_pattern(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn names_are_compared_lowercase_without_the_final_dot() {
        assert_eq!(normalize("API.Payments.Example."), "api.payments.example");
        assert_eq!(normalize("a.example"), "a.example");
        assert_eq!(normalize("a.example.."), "a.example.", "one dot only");
        assert_eq!(
            name("Api.Payments.Example."),
            FqdnSelector::Name("api.payments.example".into())
        );
        assert_eq!(
            pattern("*.Example.COM."),
            FqdnSelector::Pattern("*.example.com".into())
        );
        assert!(name("API.example.").matches(&normalize("api.EXAMPLE")));
    }

    #[test]
    fn a_name_matches_itself_only() {
        let exact = name("api.payments.example");
        assert!(exact.matches("api.payments.example"));
        for other in ["payments.example", "x.api.payments.example", "api.payments"] {
            assert!(!exact.matches(other), "{other}");
        }
    }

    #[test]
    fn a_star_matches_one_or_more_characters_within_one_label() {
        let cases = [
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "under_score-1.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "a.b.example.com", false),
            ("*.example.com", ".example.com", false),
            ("*.example.com", "a.example.org", false),
            ("api-*.example.com", "api-1.example.com", true),
            ("api-*.example.com", "api-.example.com", false),
            ("api-*.example.com", "api.example.com", false),
            ("api-*.example.com", "web-1.example.com", false),
            ("*-eu.*.example.com", "db-eu.prod.example.com", true),
            ("*-eu.*.example.com", "db-us.prod.example.com", false),
            ("a*b.example", "ab.example", false),
            ("a*b.example", "axxb.example", true),
            ("a*b.example", "abab.example", true),
            ("*.example.com", "a b.example.com", false),
            ("*", "localhost", true),
            ("*", "a.b.c.example.com", true),
            ("*", "", false),
        ];
        for (text, candidate, expected) in cases {
            assert_eq!(
                pattern(text).matches(candidate),
                expected,
                "{text} against {candidate}"
            );
        }
        assert!(pattern("*").matches_every_name());
        assert!(!pattern("*.com").matches_every_name());
    }

    #[test]
    fn invalid_names_are_refused_with_the_reason() {
        let long_label = "a".repeat(64);
        let long_name = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(62),
        ]
        .join(".");
        assert_eq!(long_name.len(), 254);
        let fits = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert!(
            FqdnSelector::parse_name(&fits).is_ok(),
            "253 characters fit"
        );
        assert!(
            FqdnSelector::parse_name(&format!("{fits}.")).is_ok(),
            "the final dot does not count"
        );
        let cases = [
            ("", false, "an empty DNS name"),
            (".", false, "an empty DNS name"),
            (long_name.as_str(), false, "254 characters long"),
            ("a..example", false, "an empty label"),
            (".example", false, "an empty label"),
            (
                &format!("{long_label}.example"),
                false,
                "64 characters long",
            ),
            ("a b.example", false, "` ` is not allowed"),
            ("a/b.example", true, "`/` is not allowed"),
            ("*.example", false, "`*` belongs in an fqdnPattern"),
            ("bücher.example", false, "`xn--` form"),
            ("*.bücher.example", true, "`xn--` form"),
        ];
        for (text, is_pattern, reason) in cases {
            let parsed = if is_pattern {
                FqdnSelector::parse_pattern(text)
            } else {
                FqdnSelector::parse_name(text)
            };
            match parsed {
                Ok(s) => panic!("{text:?} is refused, not {s}"),
                Err(e) => assert!(e.contains(reason), "{text:?}: {e:?} lacks {reason:?}"),
            }
        }
    }

    #[test]
    fn selectors_show_as_written_in_yaml() {
        assert_eq!(
            name("api.payments.example").to_string(),
            "fqdn:api.payments.example"
        );
        assert_eq!(
            pattern("*.example.com").to_string(),
            "fqdnPattern:*.example.com"
        );
        assert_eq!(pattern("*.example.com").text(), "*.example.com");
    }
}
