//! What ward needs from the host, in one place for the agent, the control plane, the tests and
//! xtask: the mount table ([`mountinfo`]), file watching ([`watch`], feature `watch`), atomic
//! file writes ([`atomic`]), child processes ([`process`]), network namespaces ([`netns`]) and the
//! open-file limit ([`rlimit`]).
pub mod atomic;
pub mod mountinfo;
pub mod netns;
pub mod process;
pub mod rlimit;
#[cfg(feature = "watch")]
pub mod watch;
