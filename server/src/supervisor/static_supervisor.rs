//! The state machine of a static supervisor: children fixed at start, restarted by strategy.
//!
//! [`SupervisorCore`] knows, for each child, whether it is running, stopped or gone, and turns
//! "child `i` exited with this reason at this instant" into a [`Decision`] the runtime carries
//! out: which children to stop, in what order, which to start again, which to forget, or that
//! the intensity was exceeded and the supervisor must give up. The rules are OTP's
//! (`supervisor.erl`: `do_restart`, `restart/3`, `terminate_children`, `start_children`,
//! `add_restart`); each is written down at the line that implements it.
//!
//! Children are named by their index in start order, which never changes: a removed child keeps
//! its index (and its spec in [`SupervisorCore::children`]) so indexes held by the runtime stay
//! valid.

use std::collections::HashSet;
use std::time::Instant;

use super::intensity::{Intensity, RestartWindow};
use super::policy::{ExitReason, RestartPolicy, Strategy};

/// One child of a static supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildSpec {
    /// Unique among its siblings; what logs and the admin API call it.
    pub name: String,
    /// Whether it is restarted after it exits.
    pub policy: RestartPolicy,
}

impl ChildSpec {
    /// A child named `name` with restart policy `policy`.
    pub fn new(name: impl Into<String>, policy: RestartPolicy) -> Self {
        ChildSpec {
            name: name.into(),
            policy,
        }
    }
}

/// Where one child stands, as its supervisor believes after the decisions it returned were
/// carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildState {
    /// Started and not known to have exited.
    Running,
    /// Exited and not restarted (a transient child that exited normally), or stopped with the
    /// whole supervisor. Still in the spec: a later `one_for_all` / `rest_for_one` restart, or
    /// [`SupervisorCore::reset`], starts it again.
    Stopped,
    /// A temporary child that exited or was stopped: gone for good (until
    /// [`SupervisorCore::reset`], which is the supervisor itself being started again).
    Removed,
}

/// What the runtime must do after a child exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to restart (e.g. a transient child exited normally, a temporary child exited).
    /// `remove` lists children (indexes) that are gone for good (temporary ones).
    Ignore { remove: Vec<usize> },
    /// Stop these still-running children, in this order (reverse start order), then start
    /// these children, in this order (start order). Children in `remove` are not restarted.
    Restart {
        stop: Vec<usize>,
        start: Vec<usize>,
        remove: Vec<usize>,
    },
    /// The intensity was exceeded: stop every child (reverse start order), then this
    /// supervisor exits and its parent decides (OTP: shutdown with reason `shutdown`).
    Escalate { stop: Vec<usize> },
}

/// The pure state machine of a static supervisor (children fixed at start, in start order).
///
/// The runtime starts every child in index order, then reports each exit it did not cause
/// through [`SupervisorCore::on_child_exit`] and carries out the returned [`Decision`]. Exits
/// of children the runtime stopped because a decision said so must not be reported: the
/// decision already accounts for them.
#[derive(Debug, Clone)]
pub struct SupervisorCore {
    strategy: Strategy,
    window: RestartWindow,
    children: Vec<ChildSpec>,
    /// One per child, same index.
    states: Vec<ChildState>,
    /// Restart decisions carried out since this core was created (escalations excluded).
    restarts_total: u64,
}

impl SupervisorCore {
    /// A supervisor whose `children`, in start order, are all running.
    ///
    /// # Panics
    ///
    /// If two children share a name: OTP refuses such a spec, and so do we.
    pub fn new(strategy: Strategy, intensity: Intensity, children: Vec<ChildSpec>) -> Self {
        let mut names = HashSet::with_capacity(children.len());
        for child in &children {
            assert!(
                names.insert(child.name.as_str()),
                "supervisor child names must be unique; `{}` appears twice",
                child.name
            );
        }
        let states = vec![ChildState::Running; children.len()];
        SupervisorCore {
            strategy,
            window: RestartWindow::new(intensity),
            children,
            states,
            restarts_total: 0,
        }
    }

    /// The strategy this supervisor restarts by.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// The intensity past which this supervisor escalates.
    pub fn intensity(&self) -> Intensity {
        self.window.intensity()
    }

    /// A child exited with `reason` at `now`: what to do, per OTP's documented semantics for
    /// one_for_one / one_for_all / rest_for_one, restart policies and intensity.
    ///
    /// # Panics
    ///
    /// If `child` is not an index into [`SupervisorCore::children`].
    pub fn on_child_exit(&mut self, child: usize, reason: &ExitReason, now: Instant) -> Decision {
        assert!(
            child < self.children.len(),
            "child index {child} out of range: this supervisor has {} children",
            self.children.len()
        );

        // OTP ignores an exit from a process it does not supervise (`restart_child` finds no
        // child): here, an exit reported for a child that is not running is stale.
        if self.states[child] != ChildState::Running {
            return Decision::Ignore { remove: Vec::new() };
        }

        let policy = self.children[child].policy;
        // OTP `do_restart`: a child whose policy says no restart is not restarted, its siblings
        // are not touched, and nothing is counted against the intensity.
        if !policy.restarts_after(reason) {
            return if policy == RestartPolicy::Temporary {
                // OTP `del_child`: a temporary child is deleted from the supervisor.
                self.states[child] = ChildState::Removed;
                Decision::Ignore {
                    remove: vec![child],
                }
            } else {
                // OTP `del_child`: any other child keeps its spec, with no process.
                self.states[child] = ChildState::Stopped;
                Decision::Ignore { remove: Vec::new() }
            };
        }

        // The child is dead whatever happens next.
        self.states[child] = ChildState::Stopped;

        // OTP `restart/2` calls `add_restart` once per restart decision, before the strategy
        // acts: one restart counts once, however many siblings it also restarts.
        if !self.window.record(now) {
            // OTP: "reached_max_restart_intensity" → the supervisor terminates all its children
            // (in reverse start order) and exits with reason `shutdown`.
            return Decision::Escalate {
                stop: self.stop_all(),
            };
        }
        self.restarts_total += 1;

        // The children the strategy restarts, in start order.
        let affected = match self.strategy {
            // OTP one_for_one: only the child that exited.
            Strategy::OneForOne => child..child + 1,
            // OTP one_for_all: every child.
            Strategy::OneForAll => 0..self.children.len(),
            // OTP rest_for_one (`split_child`): the child that exited and the ones started
            // after it; the ones started before it are not touched.
            Strategy::RestForOne => child..self.children.len(),
        };

        // OTP `terminate_children`: the affected children are stopped in reverse start order;
        // a child without a process (already stopped) needs no stopping.
        let stop: Vec<usize> = affected
            .clone()
            .rev()
            .filter(|&i| self.states[i] == ChildState::Running)
            .collect();
        // OTP `terminate_children`: a temporary child stopped because a sibling is restarted is
        // removed, not restarted.
        let remove: Vec<usize> = affected
            .clone()
            .filter(|&i| {
                self.states[i] == ChildState::Running
                    && self.children[i].policy == RestartPolicy::Temporary
            })
            .collect();
        for &i in &remove {
            self.states[i] = ChildState::Removed;
        }
        // OTP `start_children`: every affected child still in the spec is started, in start
        // order, whatever its policy, including a transient one that had exited normally
        // earlier. (The child that exited is in the spec: its policy asked for this restart.)
        let start: Vec<usize> = affected
            .filter(|&i| self.states[i] != ChildState::Removed)
            .collect();
        for &i in &start {
            self.states[i] = ChildState::Running;
        }

        debug_assert!(start.contains(&child));
        debug_assert!(!stop.contains(&child));
        Decision::Restart {
            stop,
            start,
            remove,
        }
    }

    /// Every child of the spec, in start order, removed ones included so indexes stay valid;
    /// [`SupervisorCore::child_state`] says whether each is still present.
    pub fn children(&self) -> &[ChildSpec] {
        &self.children
    }

    /// Where child `child` stands.
    ///
    /// # Panics
    ///
    /// If `child` is not an index into [`SupervisorCore::children`].
    pub fn child_state(&self, child: usize) -> ChildState {
        self.states[child]
    }

    /// Whether child `child` is still part of this supervisor (not a removed temporary child).
    ///
    /// # Panics
    ///
    /// If `child` is not an index into [`SupervisorCore::children`].
    pub fn is_present(&self, child: usize) -> bool {
        self.states[child] != ChildState::Removed
    }

    /// The restarts counted against the intensity that are inside the window at `now`.
    pub fn restarts_in_window(&self, now: Instant) -> usize {
        self.window.count(now)
    }

    /// Restart decisions carried out since this core was created.
    pub fn restarts_total(&self) -> u64 {
        self.restarts_total
    }

    /// The supervisor is stopping (escalation, or the server shutting down): the running
    /// children to stop, in reverse start order. Afterwards no child is running, and any exit
    /// still reported is ignored as stale.
    pub fn stop_all(&mut self) -> Vec<usize> {
        let stop: Vec<usize> = (0..self.children.len())
            .rev()
            .filter(|&i| self.states[i] == ChildState::Running)
            .collect();
        for state in &mut self.states {
            if *state == ChildState::Running {
                *state = ChildState::Stopped;
            }
        }
        stop
    }

    /// The supervisor was started again by its parent (after it escalated, say): as in OTP,
    /// where `init/1` runs again, every child of the spec is running again, temporary ones
    /// included, and the restart window starts empty. The total restart count is kept.
    pub fn reset(&mut self) {
        self.states.fill(ChildState::Running);
        self.window.clear();
    }
}

#[cfg(test)]
mod tests;
