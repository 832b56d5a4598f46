//! A systemd unit's `[Service]` settings, and its `ExecStart=` run under the sandbox those
//! settings ask for, without systemd (the test machine's PID 1 need not be systemd, so
//! `systemd-run` is no option).
//!
//! [`Sandbox::start`] emulates, in a private mount namespace (`unshare --mount`):
//! - `ProtectSystem=strict`: every mount read-only except below /dev, /proc and /sys;
//! - `ReadWritePaths=`: those paths stay writable (bound onto themselves, recursively, first);
//! - `RuntimeDirectory=`, `StateDirectory=` (and their `…Mode=`): an empty writable directory at
//!   /run/<name>, /var/lib/<name>, as systemd creates them for the service;
//! - `PrivateTmp=`: fresh /tmp and /var/tmp; `ProtectHome=yes`: empty read-only /home, /root,
//!   /run/user; `PrivateDevices=`: a /dev with only null, zero, full, random, urandom, tty;
//!   `ProtectKernelTunables=`: /proc/sys and /sys read-only; `ProtectControlGroups=`:
//!   /sys/fs/cgroup read-only;
//! - `CapabilityBoundingSet=`, `AmbientCapabilities=`, `NoNewPrivileges=`: through `setpriv`;
//!   `LimitMEMLOCK=infinity` through `ulimit -l` where the test may raise it (it says so where
//!   not; the kernel charges BPF memory to the memory cgroup since 5.11, not to this limit).
//!
//! It does not emulate what systemd does around the process: the unit's own cgroup, `Type=`,
//! `Restart=`, `ExecReload=`, the journal, removal of the runtime directory at stop, and the
//! runtime/state directories' ownership by a `User=` (the units run as root). A setting outside
//! this list fails the test rather than being ignored.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::Background;

/// Settings about the service's lifecycle, which the sandbox does not change.
const LIFECYCLE: &[&str] = &["Type", "ExecReload", "Restart", "RestartSec"];
/// Settings [`Sandbox::start`] emulates.
const EMULATED: &[&str] = &[
    "ExecStart",
    "LimitMEMLOCK",
    "CapabilityBoundingSet",
    "AmbientCapabilities",
    "NoNewPrivileges",
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "ProtectKernelTunables",
    "ProtectControlGroups",
    "ReadWritePaths",
    "RuntimeDirectory",
    "RuntimeDirectoryMode",
    "StateDirectory",
    "StateDirectoryMode",
];

/// The `[Service]` section of a unit file.
pub struct Unit {
    settings: Vec<(String, String)>,
}

impl Unit {
    pub fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let mut section = String::new();
        let mut settings = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
                continue;
            }
            assert!(
                !line.ends_with('\\'),
                "{}: continued lines are not parsed here",
                path.display()
            );
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: not a setting: {line}", path.display()));
            if section == "Service" {
                settings.push((key.trim().to_owned(), value.trim().to_owned()));
            }
        }
        let unit = Unit { settings };
        for (key, _) in &unit.settings {
            assert!(
                LIFECYCLE.contains(&key.as_str()) || EMULATED.contains(&key.as_str()),
                "{}: the sandbox emulation does not model {key}= (tests/src/systemd.rs)",
                path.display()
            );
        }
        unit
    }

    /// The last value of `key` (systemd's rule for single-valued settings).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.settings
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every word of every `key=` line (list settings); an empty assignment resets the list.
    pub fn words(&self, key: &str) -> Vec<&str> {
        let mut words = Vec::new();
        for (k, v) in &self.settings {
            if k == key {
                if v.is_empty() {
                    words.clear();
                }
                words.extend(v.split_whitespace());
            }
        }
        words
    }

    fn enabled(&self, key: &str) -> bool {
        matches!(self.get(key), Some("yes" | "true" | "1" | "on"))
    }

    /// `ExecStart=` as words (the units use no quoting; a quote fails the test).
    pub fn exec_start(&self) -> Vec<&str> {
        let line = self.get("ExecStart").expect("ExecStart=");
        assert!(
            !line.contains(['"', '\'']) && !line.starts_with(['-', '@', '+', '!', ':']),
            "ExecStart= with quoting or prefixes is not parsed here: {line}"
        );
        line.split_whitespace().collect()
    }
}

/// A file the test puts where the unit expects it (the binary, its configuration).
pub struct Provided<'a> {
    pub at: &'a str,
    pub from: &'a Path,
}

/// A unit's `ExecStart=` running under the emulated sandbox; stopped (SIGTERM) on drop.
pub struct Sandbox {
    pub process: Background,
    /// Mount points the emulation had to create on the host, removed on drop.
    created: Vec<PathBuf>,
}

fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn octal_mode(value: Option<&str>, default: &str) -> String {
    let mode = value.unwrap_or(default);
    assert!(
        mode.chars().all(|c| c.is_digit(8)),
        "not an octal mode: {mode}"
    );
    mode.to_owned()
}

fn setpriv_caps(names: &[&str]) -> String {
    let mut caps = vec!["-all".to_owned()];
    caps.extend(names.iter().map(|n| {
        let n = n
            .strip_prefix("CAP_")
            .unwrap_or_else(|| panic!("not a capability: {n}"));
        format!("+{}", n.to_lowercase())
    }));
    caps.join(",")
}

impl Sandbox {
    /// Starts `unit`'s `ExecStart=` with `provided` files in place, in the host's network
    /// namespace or (`own_netns`) a new one with only loopback.
    pub fn start(unit: &Unit, provided: &[Provided<'_>], own_netns: bool) -> Sandbox {
        crate::require_root();
        let mut created = Vec::new();
        // A mount point the host lacks is created (and removed again on drop), every missing
        // ancestor too.
        let mut ensure_dir = |dir: &Path| {
            let mut missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
            missing.reverse();
            for d in missing {
                std::fs::create_dir(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
                created.push(d.to_owned());
            }
        };
        let mut script = vec!["set -eu".to_owned()];
        // The test's files, each directory replaced by a tmpfs private to the namespace.
        let mut dirs: Vec<&Path> = provided
            .iter()
            .map(|p| Path::new(p.at).parent().expect("an absolute path"))
            .collect();
        dirs.sort();
        dirs.dedup();
        let tops: Vec<&Path> = dirs
            .iter()
            .filter(|d| !dirs.iter().any(|o| o != *d && d.starts_with(o)))
            .copied()
            .collect();
        for dir in tops {
            ensure_dir(dir);
            script.push(format!(
                "mount -t tmpfs -o mode=0755 tmpfs {}",
                quote(&dir.to_string_lossy())
            ));
        }
        for file in provided {
            let dir = Path::new(file.at).parent().expect("an absolute path");
            script.push(format!(
                "mkdir -p {} && cp -p {} {}",
                quote(&dir.to_string_lossy()),
                quote(&file.from.to_string_lossy()),
                quote(file.at)
            ));
        }
        // Paths that stay writable: ReadWritePaths, the runtime and state directories.
        let mut writable: Vec<String> = unit
            .words("ReadWritePaths")
            .iter()
            .map(|p| (*p).to_owned())
            .collect();
        for path in &writable {
            script.push(format!("mount --rbind {0} {0}", quote(path)));
        }
        for (key, base, default_mode) in [
            ("RuntimeDirectory", "/run", "0755"),
            ("StateDirectory", "/var/lib", "0755"),
        ] {
            let mode = octal_mode(unit.get(&format!("{key}Mode")), default_mode);
            for name in unit.words(key) {
                let dir = Path::new(base).join(name);
                ensure_dir(&dir);
                script.push(format!(
                    "mount -t tmpfs -o mode={mode} tmpfs {}",
                    quote(&dir.to_string_lossy())
                ));
                writable.push(dir.to_string_lossy().into_owned());
            }
        }
        if unit.enabled("PrivateTmp") {
            script.push("mount -t tmpfs -o mode=1777 tmpfs /tmp".to_owned());
            script.push("mount -t tmpfs -o mode=1777 tmpfs /var/tmp".to_owned());
        }
        if unit.enabled("PrivateDevices") {
            assert!(
                unit.enabled("PrivateTmp"),
                "the emulation of PrivateDevices= stages the new /dev in the private /tmp"
            );
            script.push(
                "mkdir /tmp/.dev && mount -t tmpfs -o mode=0755,nosuid tmpfs /tmp/.dev\n\
                 for n in null zero full random urandom tty; do touch /tmp/.dev/$n; \
                 mount --bind /dev/$n /tmp/.dev/$n; done\n\
                 mount --move /tmp/.dev /dev"
                    .to_owned(),
            );
        }
        if unit.enabled("ProtectHome") {
            script.push(
                "for d in /home /root /run/user; do [ -d $d ] && \
                 mount -t tmpfs -o ro,mode=0755 tmpfs $d; done; true"
                    .to_owned(),
            );
        }
        // Read-only where the settings say so.
        let mut read_only_api = Vec::new();
        if unit.enabled("ProtectKernelTunables") {
            script.push("mount --bind /proc/sys /proc/sys".to_owned());
            read_only_api.extend(["/proc/sys", "/sys"]);
        }
        if unit.enabled("ProtectControlGroups") {
            read_only_api.push("/sys/fs/cgroup");
        }
        let strict = match unit.get("ProtectSystem") {
            Some("strict") => true,
            None | Some("no") => false,
            Some(other) => panic!("the emulation models ProtectSystem=strict only, not {other}"),
        };
        let patterns = |paths: &[&str]| {
            paths
                .iter()
                .flat_map(|p| [quote(p), format!("{}/*", quote(p))])
                .collect::<Vec<_>>()
                .join("|")
        };
        let writable_refs: Vec<&str> = writable.iter().map(String::as_str).collect();
        let mut cases = Vec::new();
        if !writable_refs.is_empty() {
            cases.push(format!("{}) ;;", patterns(&writable_refs)));
        }
        if !read_only_api.is_empty() {
            cases.push(format!("{}) ro \"$m\" ;;", patterns(&read_only_api)));
        }
        cases.push("/dev|/dev/*|/proc|/proc/*|/sys|/sys/*) ;;".to_owned());
        if strict {
            cases.push("*) ro \"$m\" ;;".to_owned());
        }
        // A mount hidden below one of the tmpfs above cannot be reached by its path, and needs
        // nothing: the process cannot reach it either.
        script.push(format!(
            "ro() {{ mount -o remount,bind,ro \"$1\" 2>/dev/null || true; }}\n\
             for m in $(awk '{{print $5}}' /proc/self/mountinfo | sort -u); do\n\
             case \"$m\" in\n{}\nesac\ndone",
            cases.join("\n")
        ));
        if strict {
            script.push(
                "if touch /usr/.ward-sandbox-probe 2>/dev/null; then \
                 echo 'sandbox: / is still writable' >&2; exit 1; fi"
                    .to_owned(),
            );
        }
        if unit.get("LimitMEMLOCK") == Some("infinity") {
            // Raising the hard limit needs CAP_SYS_RESOURCE, which a test container may lack;
            // since Linux 5.11 BPF memory is charged to the memory cgroup, not to this limit.
            script.push(
                "ulimit -l unlimited 2>/dev/null || \
                 echo \"sandbox: LimitMEMLOCK=infinity not emulated: $(ulimit -l) KiB\" >&2"
                    .to_owned(),
            );
        } else {
            assert!(
                unit.get("LimitMEMLOCK").is_none(),
                "LimitMEMLOCK=infinity only"
            );
        }
        let mut setpriv = vec!["exec setpriv".to_owned()];
        if unit.get("CapabilityBoundingSet").is_some() {
            setpriv.push(format!(
                "--bounding-set {}",
                setpriv_caps(&unit.words("CapabilityBoundingSet"))
            ));
        }
        let ambient = unit.words("AmbientCapabilities");
        setpriv.push(format!("--inh-caps {}", setpriv_caps(&ambient)));
        setpriv.push(format!("--ambient-caps {}", setpriv_caps(&ambient)));
        if unit.enabled("NoNewPrivileges") {
            setpriv.push("--no-new-privs".to_owned());
        }
        setpriv.push("--".to_owned());
        setpriv.extend(unit.exec_start().iter().map(|w| quote(w)));
        script.push(setpriv.join(" "));

        let mut command = Command::new("unshare");
        command.args(["--mount", "--propagation", "private"]);
        if own_netns {
            command.arg("--net");
            script.insert(1, "ip link set lo up".to_owned());
        }
        command.args(["--", "sh", "-c", &script.join("\n")]);
        Sandbox {
            process: Background::spawn("sandboxed unit", command, false),
            created,
        }
    }

    /// `path` as the sandboxed process sees it (through /proc/<pid>/root).
    pub fn path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.process.pid()))
            .join(path.trim_start_matches('/'))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if !self.process.has_exited() {
            self.process
                .stop(libc::SIGTERM, std::time::Duration::from_secs(10));
        }
        for dir in self.created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}
