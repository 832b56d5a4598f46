//! What the runs come to: test counts read from libtest's output, and the tables printed at the
//! end of `cargo xtask vm-test`.

use std::{collections::BTreeMap, time::Duration};

/// Totals of libtest's `test result:` lines over every test executable of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestCounts {
    pub passed: usize,
    pub failed: usize,
    pub ignored: usize,
    /// Test executables that printed a result line.
    pub executables: usize,
}

impl TestCounts {
    pub fn from_libtest(output: &str) -> Self {
        let mut counts = TestCounts::default();
        for line in output.lines() {
            let Some(rest) = line.trim().strip_prefix("test result: ") else {
                continue;
            };
            counts.executables += 1;
            // "ok. 5 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out; finished in 1.2s"
            let Some((_, fields)) = rest.split_once(". ") else {
                continue;
            };
            for field in fields.split(';') {
                let mut words = field.split_whitespace();
                let (Some(number), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(number) = number.parse::<usize>() else {
                    continue;
                };
                match what {
                    "passed" => counts.passed += number,
                    "failed" => counts.failed += number,
                    "ignored" => counts.ignored += number,
                    _ => {}
                }
            }
        }
        counts
    }
}

/// One row of the final summary.
pub struct Row {
    pub kernel: String,
    /// `uname -r` as the kernel reported it.
    pub release: String,
    /// The Debian package version of a VM kernel.
    pub package_version: String,
    pub counts: TestCounts,
    pub outcome: String,
    pub duration: Duration,
    pub verifier: Result<BTreeMap<String, u32>, String>,
}

pub fn print_summary(rows: &[Row]) {
    println!("\n==> vm-test summary");
    println!(
        "  {:<6} {:<24} {:<20} {:>6} {:>6} {:>7}  result",
        "kernel", "release", "package", "passed", "failed", "time"
    );
    for row in rows {
        println!(
            "  {:<6} {:<24} {:<20} {:>6} {:>6} {:>6.0}s  {}",
            row.kernel,
            row.release,
            row.package_version,
            row.counts.passed,
            row.counts.failed,
            row.duration.as_secs_f64(),
            row.outcome
        );
    }
}

/// Verified instructions per program (rows) and kernel (columns).
pub fn print_verifier_table(rows: &[Row]) {
    println!("\n==> verifier: instructions processed per program");
    let programs: std::collections::BTreeSet<&String> = rows
        .iter()
        .filter_map(|r| r.verifier.as_ref().ok())
        .flat_map(|counts| counts.keys())
        .collect();
    let mut header = format!("  {:<16}", "program");
    for row in rows {
        header += &format!(" {:>10}", row.kernel);
    }
    println!("{header}");
    for program in &programs {
        let mut line = format!("  {program:<16}");
        for row in rows {
            let cell = match &row.verifier {
                Ok(counts) => counts
                    .get(*program)
                    .map_or("-".to_owned(), |c| c.to_string()),
                Err(_) => "n/a".to_owned(),
            };
            line += &format!(" {cell:>10}");
        }
        println!("{line}");
    }
    for row in rows {
        if let Err(why) = &row.verifier {
            println!("  {}: no record: {why}", row.kernel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_of_every_executable_are_summed() {
        let output = "\
running 3 tests
test enforce::denies ... ok
test enforce::allows ... FAILED
test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 4 filtered out; finished in 9.10s

running 1 test
test peer::parses ... ok
test result: ok. 1 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s
";
        assert_eq!(
            TestCounts::from_libtest(output),
            TestCounts {
                passed: 3,
                failed: 1,
                ignored: 2,
                executables: 2
            }
        );
    }

    #[test]
    fn output_without_result_lines_counts_nothing() {
        assert_eq!(
            TestCounts::from_libtest("Kernel panic\n"),
            TestCounts::default()
        );
    }
}
