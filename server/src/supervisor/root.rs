//! The root supervisor: one_for_one over the storage flusher, the shard supervisors and the
//! gRPC server (DESIGN §6).
//!
//! Its children restart themselves when the root allows it (a shard restarts in place, with
//! backoff); the root counts those restarts against its own intensity. Past it, or when a
//! child cannot be restarted in-process at all (the journal after a failed write or
//! `fdatasync`: nothing about the file can be assumed any more), the root gives up: it logs
//! why and triggers shutdown, and the server exits non-zero for systemd or Kubernetes to
//! restart it. It never leaves the process half-alive.

use std::sync::OnceLock;
use std::time::Instant;

use parking_lot::Mutex;

use super::{
    ChildSpec, Decision, ExitReason, Intensity, NodeKind, RestartPolicy, Strategy, SupervisorCore,
    TreeNode,
};
use crate::shutdown::Shutdown;

/// The root of the supervision tree.
pub struct RootSupervisor {
    core: Mutex<SupervisorCore>,
    intensity: Intensity,
    shutdown: Shutdown,
    gave_up: OnceLock<String>,
}

/// The names of the root's children, in start order.
fn children(shard_count: u32) -> Vec<ChildSpec> {
    let permanent = |name: String| ChildSpec {
        name,
        policy: RestartPolicy::Permanent,
    };
    let mut children = vec![permanent("storage".into())];
    children.extend((0..shard_count).map(|n| permanent(format!("shard-{n}"))));
    children.push(permanent("grpc".into()));
    children
}

impl RootSupervisor {
    pub fn new(shard_count: u32, intensity: Intensity, shutdown: Shutdown) -> Self {
        RootSupervisor {
            core: Mutex::new(SupervisorCore::new(
                Strategy::OneForOne,
                intensity,
                children(shard_count),
            )),
            intensity,
            shutdown,
            gave_up: OnceLock::new(),
        }
    }

    /// A child crashed and wants to restart. Returns whether the root allows it; when it does
    /// not, the root has already given up and the server is stopping.
    pub fn child_restarted(&self, child: &str, reason: &str) -> bool {
        let decision = {
            let mut core = self.core.lock();
            let Some(index) = core.children().iter().position(|c| c.name == child) else {
                self.give_up(format!(
                    "unknown child {child} of the root supervisor crashed: {reason}"
                ));
                return false;
            };
            core.on_child_exit(
                index,
                &ExitReason::Crashed(reason.to_owned()),
                Instant::now(),
            )
        };
        match decision {
            Decision::Escalate { .. } => {
                self.give_up(format!(
                    "{child} crashed past the root's intensity ({} restarts in {} s); last: {reason}",
                    self.intensity.max_restarts, self.intensity.max_seconds
                ));
                false
            }
            Decision::Restart { .. } | Decision::Ignore { .. } => true,
        }
    }

    /// The journal failed; it cannot be restarted in-process, so the root gives up.
    pub fn storage_failed(&self, reason: &str) {
        self.give_up(format!(
            "storage failed and cannot be restarted in-process: {reason}"
        ));
    }

    /// Why the root gave up, if it did.
    pub fn gave_up(&self) -> Option<&str> {
        self.gave_up.get().map(String::as_str)
    }

    /// The root as a tree node over `children`.
    pub fn tree(&self, children: Vec<TreeNode>) -> TreeNode {
        let now = Instant::now();
        let core = self.core.lock();
        TreeNode {
            name: "root".into(),
            kind: NodeKind::Supervisor,
            strategy: Some(Strategy::OneForOne),
            state: if self.gave_up().is_some() {
                "stopping"
            } else {
                "running"
            }
            .into(),
            restarts: core.restarts_total(),
            restarts_in_window: core.restarts_in_window(now) as u32,
            mailbox_len: None,
            last_crash: self.gave_up().map(str::to_owned),
            children,
        }
    }

    fn give_up(&self, reason: String) {
        if self.gave_up.set(reason.clone()).is_ok() {
            tracing::error!(%reason, "root supervisor gives up; the server stops and exits non-zero");
            self.shutdown.trigger();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_restarts_within_its_intensity_then_gives_up() {
        let shutdown = Shutdown::new();
        let root = RootSupervisor::new(
            2,
            Intensity {
                max_restarts: 2,
                max_seconds: 60,
            },
            shutdown.clone(),
        );
        assert!(root.child_restarted("shard-1", "boom"));
        assert!(root.child_restarted("shard-0", "boom"));
        assert!(!shutdown.is_triggered());
        assert!(!root.child_restarted("shard-1", "boom again"));
        assert!(shutdown.is_triggered());
        assert!(root
            .gave_up()
            .is_some_and(|r| r.contains("shard-1") && r.contains("boom again")));
    }

    #[test]
    fn a_storage_failure_gives_up_at_once() {
        let shutdown = Shutdown::new();
        let root = RootSupervisor::new(
            1,
            Intensity {
                max_restarts: 5,
                max_seconds: 60,
            },
            shutdown.clone(),
        );
        root.storage_failed("fdatasync: EIO");
        assert!(shutdown.is_triggered());
        assert!(root.gave_up().is_some_and(|r| r.contains("EIO")));
    }
}
