//! The VMs of one behaviour version, shared by all its entities.
//!
//! **Owns**: handing a VM to one caller at a time, creating one when none is idle, and
//! dropping a VM that broke a limit instead of reusing it.
//! **Calls**: [`Vm::new`].
//!
//! Napkin math: a VM with a small script costs a few hundred KiB; an entity costs only its
//! state value, held by the engine. At most one VM per concurrent caller exists at a time
//! (callers are runtime worker threads, so a handful), and at most `idle_max` (the number of
//! cores) stay around between calls. Memory is bounded by VMs in use × `memory_bytes_max`.

use std::sync::Arc;

use parking_lot::Mutex;

use super::vm::{Script, Vm};
use crate::behaviour::BehaviourError;

/// A stack of idle VMs of one script.
pub(super) struct Pool {
    script: Arc<Script>,
    idle: Mutex<Vec<Vm>>,
    idle_max: usize,
}

impl Pool {
    /// A pool holding `first`, the VM that compile built and checked.
    pub(super) fn new(first: Vm) -> Pool {
        let idle_max = std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(4);
        let script = Arc::clone(first.script_arc());
        Pool {
            script,
            idle: Mutex::new(vec![first]),
            idle_max,
        }
    }

    /// The script every VM of this pool runs.
    pub(super) fn script(&self) -> &Script {
        &self.script
    }

    /// Runs `f` on a VM of its own: an idle one, or a new one. Afterwards the VM goes back to
    /// the pool, unless it is poisoned or enough VMs are idle already.
    pub(super) fn with_vm<R>(
        &self,
        f: impl FnOnce(&mut Vm) -> Result<R, BehaviourError>,
    ) -> Result<R, BehaviourError> {
        // The lock is held only to pop and push, never while a script runs.
        let idle = self.idle.lock().pop();
        let mut vm = match idle {
            Some(vm) => vm,
            None => Vm::new(Arc::clone(&self.script))
                .map_err(|e| BehaviourError::Failed(e.to_string()))?,
        };
        vm.collect_garbage_if_crowded();
        let result = f(&mut vm);
        if !vm.poisoned {
            let mut idle = self.idle.lock();
            if idle.len() < self.idle_max {
                idle.push(vm);
            }
        }
        result
    }

    /// How many VMs are idle now.
    #[cfg(test)]
    pub(super) fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }
}
