//! The bounds every script call runs under, and the meter that enforces the CPU ones.
//!
//! **Owns**: [`LuaLimits`] (the configurable bounds), [`Meter`] (the per-VM counter the
//! interrupt reads) and [`Tripped`] (which bound a call broke).
//! **Calls**: nothing but the clock; the VM installs [`Meter::interrupt`] as its interrupt.
//!
//! Luau calls the interrupt at every function call and loop back-edge, not at each bytecode
//! instruction, so the instruction budget counts those *interrupt points*: a loop iteration or a
//! call each costs one, whatever its body does. A script cannot run without passing them, so
//! the budget bounds any runaway loop or recursion. A single C function (say `string.rep`)
//! runs between two points; the memory limit bounds what it can do, and the wall-clock
//! backstop catches a slow sequence of them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// The bounds on one script, applied to every call into it (`init`, a handler, `apply`,
/// `migrate`) and to each VM that runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuaLimits {
    /// The CPU budget of one call, in interrupt points (function calls and loop iterations).
    pub instructions_max: u64,
    /// The memory one VM may hold, script and the states it is converting included.
    pub memory_bytes_max: usize,
    /// The wall-clock backstop of one call, checked at every interrupt point.
    pub call_timeout: Duration,
}

impl Default for LuaLimits {
    /// 1 M interrupt points, 64 MiB per VM, 1 s per call.
    ///
    /// Napkin math: an interrupt point costs about 40 ns in a release build (measured: a tight
    /// loop runs 10 M of them in 0.38 s), so the budget lets a call run about 40 ms. A call
    /// runs on a runtime worker thread, so a runaway script should hold one for tens of
    /// milliseconds, not a second; a cart handler needs well under a hundred points. The
    /// wall-clock backstop only matters when a slow sequence of C functions runs between
    /// points.
    fn default() -> Self {
        LuaLimits {
            instructions_max: 1_000_000,
            memory_bytes_max: 64 * 1024 * 1024,
            call_timeout: Duration::from_secs(1),
        }
    }
}

/// Which bound a call broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tripped {
    Instructions,
    Time,
}

const TRIPPED_NONE: u8 = 0;
const TRIPPED_INSTRUCTIONS: u8 = 1;
const TRIPPED_TIME: u8 = 2;

/// Counts one VM's interrupt points during a call and trips past the budget or the deadline.
///
/// A VM is used by one thread at a time, so the atomics are only there to make the interrupt
/// closure `Send`; relaxed ordering is enough. Once tripped, every later interrupt point of the
/// same call fails again, so a script's `pcall` cannot swallow the limit and carry on.
#[derive(Debug)]
pub(super) struct Meter {
    /// The instant `deadline_nanos` counts from.
    origin: Instant,
    armed: AtomicBool,
    ticks_left: AtomicU64,
    deadline_nanos: AtomicU64,
    tripped: AtomicU8,
}

impl Meter {
    /// A disarmed meter: interrupts outside a call pass freely.
    pub(super) fn new() -> Self {
        Meter {
            origin: Instant::now(),
            armed: AtomicBool::new(false),
            ticks_left: AtomicU64::new(0),
            deadline_nanos: AtomicU64::new(0),
            tripped: AtomicU8::new(TRIPPED_NONE),
        }
    }

    /// Starts metering a call.
    pub(super) fn arm(&self, limits: &LuaLimits) {
        let deadline = self.origin.elapsed().saturating_add(limits.call_timeout);
        let deadline_nanos = u64::try_from(deadline.as_nanos()).unwrap_or(u64::MAX);
        self.ticks_left
            .store(limits.instructions_max, Ordering::Relaxed);
        self.deadline_nanos.store(deadline_nanos, Ordering::Relaxed);
        self.tripped.store(TRIPPED_NONE, Ordering::Relaxed);
        self.armed.store(true, Ordering::Relaxed);
    }

    /// Stops metering and says which bound, if any, the call broke.
    pub(super) fn disarm(&self) -> Option<Tripped> {
        self.armed.store(false, Ordering::Relaxed);
        match self.tripped.load(Ordering::Relaxed) {
            TRIPPED_INSTRUCTIONS => Some(Tripped::Instructions),
            TRIPPED_TIME => Some(Tripped::Time),
            _ => None,
        }
    }

    /// Called at every interrupt point: `Err` aborts the script with a Lua error.
    pub(super) fn interrupt(&self) -> Result<(), Tripped> {
        if !self.armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        match self.tripped.load(Ordering::Relaxed) {
            TRIPPED_INSTRUCTIONS => return Err(Tripped::Instructions),
            TRIPPED_TIME => return Err(Tripped::Time),
            _ => {}
        }
        let left = self.ticks_left.load(Ordering::Relaxed);
        if left == 0 {
            self.tripped.store(TRIPPED_INSTRUCTIONS, Ordering::Relaxed);
            return Err(Tripped::Instructions);
        }
        self.ticks_left.store(left - 1, Ordering::Relaxed);
        let now_nanos = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if now_nanos > self.deadline_nanos.load(Ordering::Relaxed) {
            self.tripped.store(TRIPPED_TIME, Ordering::Relaxed);
            return Err(Tripped::Time);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meter_trips_after_the_budget_and_stays_tripped() {
        let meter = Meter::new();
        let limits = LuaLimits {
            instructions_max: 3,
            ..LuaLimits::default()
        };
        meter.arm(&limits);
        for _ in 0..3 {
            assert_eq!(meter.interrupt(), Ok(()));
        }
        assert_eq!(meter.interrupt(), Err(Tripped::Instructions));
        assert_eq!(meter.interrupt(), Err(Tripped::Instructions));
        assert_eq!(meter.disarm(), Some(Tripped::Instructions));
        // Disarmed, it lets everything through; re-armed, it starts afresh.
        assert_eq!(meter.interrupt(), Ok(()));
        meter.arm(&limits);
        assert_eq!(meter.interrupt(), Ok(()));
        assert_eq!(meter.disarm(), None);
    }

    #[test]
    fn meter_trips_past_the_deadline() {
        let meter = Meter::new();
        let limits = LuaLimits {
            call_timeout: Duration::ZERO,
            ..LuaLimits::default()
        };
        meter.arm(&limits);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(meter.interrupt(), Err(Tripped::Time));
        assert_eq!(meter.disarm(), Some(Tripped::Time));
    }
}
