//! Reading the agent's and the control plane's text logs: `key=value` fields, the timestamp that
//! starts each line, and the `policy applied` line the agent writes after a kernel map write.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The value of ` key=value` in a text log line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split(' ').next().map(|v| v.trim_matches('"'))
}

/// The RFC 3339 UTC timestamp (`2026-01-02T03:04:05.123456Z`) that starts a log line.
pub fn timestamp(line: &str) -> Option<SystemTime> {
    let text = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<u64>());
    let (h, min, s) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let nanos: u64 = format!("{fraction:0<9}").get(..9)?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    let secs = days * 86_400 + h * 3600 + min * 60 + s;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(nanos))
}

/// The entry count ward logs once it wrote the policy: the last `...entries=N` field.
pub fn logged_entries(log: &str) -> Option<usize> {
    log.lines()
        .flat_map(str::split_whitespace)
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| k.ends_with("entries"))
        .filter_map(|(_, v)| v.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .next_back()
}

/// A line that says a policy generation is in force, logged after the agent wrote the whole
/// generation to the kernel and switched to it: `ready: enforcing` (the first, at start) or
/// `policy applied` (a reload).
#[derive(Debug, PartialEq)]
pub struct Applied {
    pub at: SystemTime,
    pub generation: u32,
    pub entries: usize,
    /// The kernel map write, as the agent timed it (`duration_ms`).
    pub write_ms: Option<f64>,
    /// Reading and compiling the policy before the write (`compile_ms`).
    pub compile_ms: Option<f64>,
    /// From the start of the write to the switch that put the generation in force
    /// (`enforced_ms`).
    pub enforced_ms: Option<f64>,
}

impl Applied {
    pub fn parse(line: &str) -> Option<Self> {
        if !line.contains("policy applied") && !line.contains("ready: enforcing") {
            return None;
        }
        Some(Self {
            at: timestamp(line)?,
            generation: field(line, "generation")?.parse().ok()?,
            entries: field(line, "entries")?.parse().ok()?,
            write_ms: field(line, "duration_ms").and_then(|v| v.parse().ok()),
            compile_ms: field(line, "compile_ms").and_then(|v| v.parse().ok()),
            enforced_ms: field(line, "enforced_ms").and_then(|v| v.parse().ok()),
        })
    }

    /// Every such line of `log`, in order.
    pub fn all(log: &str) -> Vec<Self> {
        log.lines().filter_map(Self::parse).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_parse_to_the_same_instant() {
        let at = timestamp("2026-11-23T12:47:45.317412Z  INFO ward::app: ready").expect("parses");
        let secs = at.duration_since(UNIX_EPOCH).expect("after 1970");
        // date -d 2026-11-23T12:47:45Z +%s
        assert_eq!(secs.as_secs(), 1_795_438_065);
        assert_eq!(secs.subsec_micros(), 317_412);
        assert_eq!(timestamp("INFO ready"), None);
    }

    #[test]
    fn fields_are_found_by_key() {
        let line = "2026-01-01T00:00:00Z INFO ward_control: policy set updated reason=\"file change\" policies=2 version=ab-3-cd";
        assert_eq!(field(line, "version"), Some("ab-3-cd"));
        assert_eq!(field(line, "reason"), Some("file"));
        assert_eq!(field(line, "missing"), None);
    }

    #[test]
    fn entry_counts_come_from_the_log() {
        let log = "INFO ward: policy applied policies=1 entries=1002\nINFO ward: ready\n";
        assert_eq!(logged_entries(log), Some(1002));
        assert_eq!(logged_entries("INFO ward: ready"), None);
    }

    #[test]
    fn applied_lines_carry_generation_entries_and_write_time() {
        let log = "2026-12-02T14:00:00.5Z  INFO ward::enforcer: policy applied reason=\"policy file changed\" generation=7 entries=100003 duration_ms=812.25\n\
                   2026-12-02T14:00:00.6Z  INFO ward::app: ready\n";
        let applied = Applied::all(log);
        assert_eq!(applied.len(), 1);
        assert_eq!(applied[0].generation, 7);
        assert_eq!(applied[0].entries, 100_003);
        assert_eq!(applied[0].write_ms, Some(812.25));
        let since_epoch = applied[0]
            .at
            .duration_since(UNIX_EPOCH)
            .expect("after 1970");
        assert_eq!(since_epoch.subsec_millis(), 500);
        assert_eq!(
            Applied::parse("2026-12-02T14:00:00Z INFO ward: ready"),
            None
        );
    }
}
