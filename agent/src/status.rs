//! What `ward status` shows: the agent, the kernel, what is attached and pinned, the policy in
//! force, the workloads on this node and how full the kernel maps are.
use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub kernel: String,
    pub kernel_features: String,
    pub pin_dir: String,
    pub cgroup_root: String,
    pub attachment: String,
    pub programs: Vec<ProgramStatus>,
    pub policy: PolicyStatus,
    pub workloads: Vec<WorkloadStatus>,
    pub control_plane: String,
    pub maps: Vec<MapStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgramStatus {
    pub name: String,
    pub attach_point: String,
    pub program_id: Option<u32>,
    pub link_pinned: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub generation: u32,
    pub entries: usize,
    pub rules: usize,
    pub files: Vec<String>,
    pub last_applied: String,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkloadStatus {
    pub name: String,
    pub spiffe_id: String,
    pub identity: u32,
    pub cgroups: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapStatus {
    pub name: String,
    pub entries: usize,
    pub capacity: u32,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "ward {}  kernel {}", self.version, self.kernel)?;
        writeln!(f, "kernel features: {}", self.kernel_features)?;
        writeln!(f, "pinned state:    {} ({})", self.pin_dir, self.attachment)?;
        writeln!(f, "cgroup root:     {}", self.cgroup_root)?;
        writeln!(f, "control plane:   {}", self.control_plane)?;
        writeln!(f, "\nprograms")?;
        for p in &self.programs {
            let id = p.program_id.map_or("-".to_string(), |id| id.to_string());
            let pinned = if p.link_pinned {
                "link pinned"
            } else {
                "NOT ATTACHED"
            };
            writeln!(
                f,
                "  {:<16} {:<22} prog {:<6} {}",
                p.name, p.attach_point, id, pinned
            )?;
        }
        let p = &self.policy;
        writeln!(
            f,
            "\npolicy: generation {}, {} rules, {} kernel entries, applied {}",
            p.generation, p.rules, p.entries, p.last_applied
        )?;
        for file in &p.files {
            writeln!(f, "  {file}")?;
        }
        if let Some(e) = &p.last_error {
            writeln!(f, "  last reload refused: {e}")?;
        }
        writeln!(f, "\nworkloads")?;
        for w in &self.workloads {
            writeln!(
                f,
                "  {:<16} {:<48} id {:<9} {} cgroup(s)",
                w.name, w.spiffe_id, w.identity, w.cgroups
            )?;
        }
        writeln!(f, "\nmaps")?;
        for m in &self.maps {
            let pct = if m.capacity == 0 {
                0.0
            } else {
                100.0 * m.entries as f64 / f64::from(m.capacity)
            };
            writeln!(
                f,
                "  {:<18} {:>8} / {:<8} {:5.1}%",
                m.name, m.entries, m.capacity, pct
            )?;
        }
        Ok(())
    }
}
