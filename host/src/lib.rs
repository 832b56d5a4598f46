//! What ward needs from the host, in one place for the agent, the control plane, the tests and
//! xtask: the mount table ([`mountinfo`]), file watching ([`watch`], feature `watch`), atomic
//! file writes ([`atomic`]) and child processes ([`process`]).
pub mod atomic;
pub mod mountinfo;
pub mod process;
#[cfg(feature = "watch")]
pub mod watch;
