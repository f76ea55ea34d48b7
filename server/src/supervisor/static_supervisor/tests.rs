//! Each test names the OTP rule it checks. Children are `c0`, `c1`, ... in start order; time is
//! synthetic (`t0` plus whole seconds), so nothing sleeps.

use std::time::{Duration, Instant};

use super::*;
use RestartPolicy::{Permanent, Temporary, Transient};
use Strategy::{OneForAll, OneForOne, RestForOne};

/// An intensity no test reaches unless it means to.
const LAX: Intensity = Intensity {
    max_restarts: 1_000,
    max_seconds: 60,
};

fn supervisor(
    strategy: Strategy,
    intensity: Intensity,
    policies: &[RestartPolicy],
) -> SupervisorCore {
    let children = policies
        .iter()
        .enumerate()
        .map(|(i, &policy)| ChildSpec::new(format!("c{i}"), policy))
        .collect();
    SupervisorCore::new(strategy, intensity, children)
}

fn lax(strategy: Strategy, policies: &[RestartPolicy]) -> SupervisorCore {
    supervisor(strategy, LAX, policies)
}

fn crash() -> ExitReason {
    ExitReason::Crashed("boom".to_owned())
}

fn at(t0: Instant, seconds: u64) -> Instant {
    t0 + Duration::from_secs(seconds)
}

fn restart(stop: &[usize], start: &[usize], remove: &[usize]) -> Decision {
    Decision::Restart {
        stop: stop.to_vec(),
        start: start.to_vec(),
        remove: remove.to_vec(),
    }
}

fn ignore(remove: &[usize]) -> Decision {
    Decision::Ignore {
        remove: remove.to_vec(),
    }
}

fn escalate(stop: &[usize]) -> Decision {
    Decision::Escalate {
        stop: stop.to_vec(),
    }
}

fn states(sup: &SupervisorCore) -> Vec<ChildState> {
    (0..sup.children().len())
        .map(|i| sup.child_state(i))
        .collect()
}

use ChildState::{Removed, Running, Stopped};

// ---- Every strategy × policy × exit reason, for the middle of three permanent siblings. ----

#[test]
fn every_strategy_policy_and_exit_reason_combination() {
    let t0 = Instant::now();
    let reasons = [ExitReason::Normal, ExitReason::Shutdown, crash()];
    for strategy in [OneForOne, OneForAll, RestForOne] {
        for policy in [Permanent, Transient, Temporary] {
            for reason in &reasons {
                let mut sup = lax(strategy, &[Permanent, policy, Permanent]);
                let decision = sup.on_child_exit(1, reason, t0);
                let restarts = policy.restarts_after(reason);
                let expected = match (restarts, strategy) {
                    // The strategy decides who restarts with the child.
                    (true, OneForOne) => restart(&[], &[1], &[]),
                    (true, OneForAll) => restart(&[2, 0], &[0, 1, 2], &[]),
                    (true, RestForOne) => restart(&[2], &[1, 2], &[]),
                    // No restart: nobody else is touched, whatever the strategy.
                    (false, _) if policy == Temporary => ignore(&[1]),
                    (false, _) => ignore(&[]),
                };
                assert_eq!(
                    decision, expected,
                    "{strategy} / {policy} child exiting with {reason}"
                );
                let expected_in_window = usize::from(restarts);
                assert_eq!(
                    sup.restarts_in_window(t0),
                    expected_in_window,
                    "{strategy} / {policy} child exiting with {reason}"
                );
            }
        }
    }
}

#[test]
fn every_strategy_with_siblings_of_every_policy() {
    let t0 = Instant::now();
    for strategy in [OneForOne, OneForAll, RestForOne] {
        for sibling in [Permanent, Transient, Temporary] {
            let mut sup = lax(strategy, &[sibling, Permanent, sibling]);
            let decision = sup.on_child_exit(1, &crash(), t0);
            let expected = match (strategy, sibling) {
                (OneForOne, _) => restart(&[], &[1], &[]),
                // A temporary sibling stopped for the restart is removed, not started again.
                (OneForAll, Temporary) => restart(&[2, 0], &[1], &[0, 2]),
                (OneForAll, _) => restart(&[2, 0], &[0, 1, 2], &[]),
                (RestForOne, Temporary) => restart(&[2], &[1], &[2]),
                (RestForOne, _) => restart(&[2], &[1, 2], &[]),
            };
            assert_eq!(decision, expected, "{strategy} with {sibling} siblings");
        }
    }
}

// ---- one_for_one ----

#[test]
fn one_for_one_restarts_only_the_child_that_crashed() {
    let t0 = Instant::now();
    let mut sup = lax(OneForOne, &[Permanent, Permanent, Permanent, Permanent]);
    assert_eq!(sup.on_child_exit(2, &crash(), t0), restart(&[], &[2], &[]));
    assert_eq!(states(&sup), [Running; 4]);
}

#[test]
fn one_for_one_permanent_child_is_restarted_even_after_a_normal_exit() {
    let t0 = Instant::now();
    let mut sup = lax(OneForOne, &[Permanent, Permanent]);
    assert_eq!(
        sup.on_child_exit(0, &ExitReason::Normal, t0),
        restart(&[], &[0], &[])
    );
    assert_eq!(
        sup.on_child_exit(1, &ExitReason::Shutdown, t0),
        restart(&[], &[1], &[])
    );
}

#[test]
fn one_for_one_transient_child_is_restarted_after_a_crash() {
    let t0 = Instant::now();
    let mut sup = lax(OneForOne, &[Permanent, Transient]);
    assert_eq!(sup.on_child_exit(1, &crash(), t0), restart(&[], &[1], &[]));
    assert_eq!(sup.child_state(1), Running);
}

#[test]
fn one_for_one_transient_child_that_exits_normally_is_not_restarted_but_kept() {
    let t0 = Instant::now();
    let mut sup = lax(OneForOne, &[Transient, Transient]);
    assert_eq!(sup.on_child_exit(0, &ExitReason::Normal, t0), ignore(&[]));
    assert_eq!(sup.on_child_exit(1, &ExitReason::Shutdown, t0), ignore(&[]));
    assert_eq!(states(&sup), [Stopped, Stopped]);
    assert!(sup.is_present(0) && sup.is_present(1));
    assert_eq!(sup.restarts_in_window(t0), 0);
}

#[test]
fn one_for_one_temporary_child_is_removed_whatever_its_exit() {
    let t0 = Instant::now();
    let mut sup = lax(OneForOne, &[Temporary, Temporary, Permanent]);
    assert_eq!(sup.on_child_exit(0, &crash(), t0), ignore(&[0]));
    assert_eq!(sup.on_child_exit(1, &ExitReason::Normal, t0), ignore(&[1]));
    assert_eq!(states(&sup), [Removed, Removed, Running]);
    assert!(!sup.is_present(0));
    // Removed children keep their index and spec.
    assert_eq!(sup.children()[1].name, "c1");
}

// ---- one_for_all ----

#[test]
fn one_for_all_stops_siblings_in_reverse_start_order_then_starts_all_in_start_order() {
    let t0 = Instant::now();
    let mut sup = lax(OneForAll, &[Permanent, Permanent, Permanent, Permanent]);
    assert_eq!(
        sup.on_child_exit(1, &crash(), t0),
        restart(&[3, 2, 0], &[0, 1, 2, 3], &[])
    );
    assert_eq!(states(&sup), [Running; 4]);
}

#[test]
fn one_for_all_temporary_sibling_stopped_for_a_restart_is_removed_not_restarted() {
    let t0 = Instant::now();
    let mut sup = lax(OneForAll, &[Temporary, Permanent, Transient, Temporary]);
    assert_eq!(
        sup.on_child_exit(1, &crash(), t0),
        restart(&[3, 2, 0], &[1, 2], &[0, 3])
    );
    assert_eq!(states(&sup), [Removed, Running, Running, Removed]);
}

#[test]
fn one_for_all_removed_temporary_child_stays_removed_on_later_restarts() {
    let t0 = Instant::now();
    let mut sup = lax(OneForAll, &[Permanent, Temporary, Permanent]);
    assert_eq!(sup.on_child_exit(1, &crash(), t0), ignore(&[1]));
    assert_eq!(
        sup.on_child_exit(0, &crash(), at(t0, 1)),
        restart(&[2], &[0, 2], &[])
    );
    assert_eq!(states(&sup), [Running, Removed, Running]);
}

#[test]
fn one_for_all_starts_again_a_transient_sibling_that_had_exited_normally() {
    // OTP `start_children` starts every child still in the spec, running or not.
    let t0 = Instant::now();
    let mut sup = lax(OneForAll, &[Permanent, Transient, Permanent]);
    assert_eq!(sup.on_child_exit(1, &ExitReason::Normal, t0), ignore(&[]));
    assert_eq!(
        sup.on_child_exit(2, &crash(), at(t0, 1)),
        // c1 has no process to stop, but is started again.
        restart(&[0], &[0, 1, 2], &[])
    );
    assert_eq!(states(&sup), [Running; 3]);
}

#[test]
fn one_for_all_transient_child_that_crashes_restarts_everyone() {
    let t0 = Instant::now();
    let mut sup = lax(OneForAll, &[Permanent, Transient, Permanent]);
    assert_eq!(
        sup.on_child_exit(1, &crash(), t0),
        restart(&[2, 0], &[0, 1, 2], &[])
    );
}

#[test]
fn one_for_all_child_that_is_not_restarted_leaves_its_siblings_alone() {
    let t0 = Instant::now();
    let mut sup = lax(OneForAll, &[Permanent, Transient, Temporary, Permanent]);
    assert_eq!(sup.on_child_exit(1, &ExitReason::Normal, t0), ignore(&[]));
    assert_eq!(sup.on_child_exit(2, &crash(), t0), ignore(&[2]));
    assert_eq!(states(&sup), [Running, Stopped, Removed, Running]);
    assert_eq!(sup.restarts_in_window(t0), 0);
}

// ---- rest_for_one ----

#[test]
fn rest_for_one_restarts_the_failed_child_and_those_started_after_it_only() {
    let t0 = Instant::now();
    let mut sup = lax(
        RestForOne,
        &[Permanent, Permanent, Permanent, Permanent, Permanent],
    );
    assert_eq!(
        sup.on_child_exit(2, &crash(), t0),
        // Stop c4 then c3 (reverse start order); start c2, c3, c4; c0 and c1 untouched.
        restart(&[4, 3], &[2, 3, 4], &[])
    );
    assert_eq!(states(&sup), [Running; 5]);
}

#[test]
fn rest_for_one_crash_of_the_last_child_restarts_only_it() {
    let t0 = Instant::now();
    let mut sup = lax(RestForOne, &[Permanent, Permanent, Permanent]);
    assert_eq!(sup.on_child_exit(2, &crash(), t0), restart(&[], &[2], &[]));
}

#[test]
fn rest_for_one_crash_of_the_first_child_restarts_all() {
    let t0 = Instant::now();
    let mut sup = lax(RestForOne, &[Permanent, Permanent, Permanent]);
    assert_eq!(
        sup.on_child_exit(0, &crash(), t0),
        restart(&[2, 1], &[0, 1, 2], &[])
    );
}

#[test]
fn rest_for_one_temporary_children_after_the_failed_one_are_removed_those_before_untouched() {
    let t0 = Instant::now();
    let mut sup = lax(RestForOne, &[Temporary, Permanent, Temporary, Permanent]);
    assert_eq!(
        sup.on_child_exit(1, &crash(), t0),
        restart(&[3, 2], &[1, 3], &[2])
    );
    assert_eq!(states(&sup), [Running, Running, Removed, Running]);
}

#[test]
fn rest_for_one_starts_again_a_stopped_transient_child_after_the_failed_one_but_not_before() {
    let t0 = Instant::now();
    let mut sup = lax(RestForOne, &[Transient, Permanent, Transient]);
    assert_eq!(sup.on_child_exit(0, &ExitReason::Normal, t0), ignore(&[]));
    assert_eq!(sup.on_child_exit(2, &ExitReason::Normal, t0), ignore(&[]));
    assert_eq!(
        sup.on_child_exit(1, &crash(), at(t0, 1)),
        restart(&[], &[1, 2], &[])
    );
    assert_eq!(states(&sup), [Stopped, Running, Running]);
}

#[test]
fn rest_for_one_child_that_is_not_restarted_leaves_later_siblings_alone() {
    let t0 = Instant::now();
    let mut sup = lax(RestForOne, &[Transient, Temporary, Permanent]);
    assert_eq!(sup.on_child_exit(0, &ExitReason::Shutdown, t0), ignore(&[]));
    assert_eq!(sup.on_child_exit(1, &crash(), t0), ignore(&[1]));
    assert_eq!(states(&sup), [Stopped, Removed, Running]);
}

// ---- intensity ----

#[test]
fn exactly_max_restarts_within_max_seconds_restart_then_the_next_escalates() {
    let t0 = Instant::now();
    let intensity = Intensity {
        max_restarts: 3,
        max_seconds: 10,
    };
    let mut sup = supervisor(OneForOne, intensity, &[Permanent, Permanent]);
    for i in 0..3 {
        assert_eq!(
            sup.on_child_exit(0, &crash(), at(t0, i)),
            restart(&[], &[0], &[]),
            "restart {i}"
        );
    }
    assert_eq!(sup.restarts_in_window(at(t0, 2)), 3);
    assert_eq!(sup.on_child_exit(0, &crash(), at(t0, 3)), escalate(&[1]));
    assert_eq!(sup.restarts_total(), 3);
}

#[test]
fn one_restart_decision_counts_once_however_many_children_it_restarts() {
    let t0 = Instant::now();
    let intensity = Intensity {
        max_restarts: 1,
        max_seconds: 10,
    };
    let mut sup = supervisor(OneForAll, intensity, &[Permanent; 5]);
    assert_eq!(
        sup.on_child_exit(4, &crash(), t0),
        restart(&[3, 2, 1, 0], &[0, 1, 2, 3, 4], &[])
    );
    assert_eq!(sup.restarts_in_window(t0), 1);
    assert_eq!(sup.restarts_total(), 1);
}

#[test]
fn an_exit_that_causes_no_restart_counts_nothing_against_the_intensity() {
    let t0 = Instant::now();
    let intensity = Intensity {
        max_restarts: 0,
        max_seconds: 10,
    };
    let mut sup = supervisor(OneForAll, intensity, &[Transient, Temporary, Permanent]);
    assert_eq!(sup.on_child_exit(0, &ExitReason::Normal, t0), ignore(&[]));
    assert_eq!(sup.on_child_exit(1, &crash(), t0), ignore(&[1]));
    assert_eq!(sup.restarts_in_window(t0), 0);
    assert_eq!(sup.restarts_total(), 0);
}

#[test]
fn max_restarts_zero_escalates_on_the_first_restart() {
    let t0 = Instant::now();
    let intensity = Intensity {
        max_restarts: 0,
        max_seconds: 10,
    };
    let mut sup = supervisor(OneForOne, intensity, &[Permanent, Permanent, Permanent]);
    assert_eq!(sup.on_child_exit(1, &crash(), t0), escalate(&[2, 0]));
    assert_eq!(sup.restarts_total(), 0);
}

#[test]
fn restarts_older_than_max_seconds_fall_out_of_the_window() {
    let t0 = Instant::now();
    let intensity = Intensity {
        max_restarts: 2,
        max_seconds: 10,
    };
    let mut sup = supervisor(OneForOne, intensity, &[Permanent]);
    assert_eq!(sup.on_child_exit(0, &crash(), t0), restart(&[], &[0], &[]));
    assert_eq!(
        sup.on_child_exit(0, &crash(), at(t0, 5)),
        restart(&[], &[0], &[])
    );
    // t0's restart is 11 s old now: two in the window, including this one.
    assert_eq!(
        sup.on_child_exit(0, &crash(), at(t0, 11)),
        restart(&[], &[0], &[])
    );
    assert_eq!(sup.restarts_in_window(at(t0, 11)), 2);
    assert_eq!(sup.restarts_in_window(at(t0, 30)), 0);
    // Three within 10 s (at 5, 11, 12): escalate.
    assert_eq!(sup.on_child_exit(0, &crash(), at(t0, 12)), escalate(&[]));
}

#[test]
fn escalation_stops_every_running_child_in_reverse_start_order() {
    let t0 = Instant::now();
    let intensity = Intensity {
        max_restarts: 0,
        max_seconds: 10,
    };
    let mut sup = supervisor(
        RestForOne,
        intensity,
        &[Permanent, Transient, Permanent, Temporary, Permanent],
    );
    // c1 has no process, so there is nothing to stop; c2 is the one that crashed.
    assert_eq!(sup.on_child_exit(1, &ExitReason::Normal, t0), ignore(&[]));
    assert_eq!(sup.on_child_exit(2, &crash(), t0), escalate(&[4, 3, 0]));
    assert_eq!(states(&sup), [Stopped; 5]);
}

#[test]
fn after_escalation_every_exit_is_stale_and_reset_starts_the_whole_spec_again() {
    let t0 = Instant::now();
    let intensity = Intensity {
        max_restarts: 0,
        max_seconds: 10,
    };
    let mut sup = supervisor(OneForAll, intensity, &[Permanent, Temporary, Permanent]);
    assert_eq!(sup.on_child_exit(0, &crash(), t0), escalate(&[2, 1]));
    // The runtime stopped c1 and c2 itself; should it still report them, they are stale.
    assert_eq!(sup.on_child_exit(2, &ExitReason::Shutdown, t0), ignore(&[]));
    assert_eq!(sup.on_child_exit(1, &crash(), t0), ignore(&[]));
    // The parent restarts the supervisor: OTP runs `init/1` again, the whole spec starts.
    sup.reset();
    assert_eq!(states(&sup), [Running; 3]);
    assert_eq!(sup.restarts_in_window(t0), 0);
}

#[test]
fn an_exit_reported_for_a_child_that_is_not_running_is_ignored() {
    let t0 = Instant::now();
    let mut sup = lax(OneForOne, &[Transient, Temporary]);
    assert_eq!(sup.on_child_exit(0, &ExitReason::Normal, t0), ignore(&[]));
    assert_eq!(sup.on_child_exit(0, &crash(), t0), ignore(&[]));
    assert_eq!(sup.on_child_exit(1, &crash(), t0), ignore(&[1]));
    assert_eq!(sup.on_child_exit(1, &crash(), t0), ignore(&[]));
    assert_eq!(sup.restarts_in_window(t0), 0);
}

#[test]
fn stop_all_stops_running_children_in_reverse_start_order() {
    let t0 = Instant::now();
    let mut sup = lax(OneForOne, &[Permanent, Transient, Temporary, Permanent]);
    assert_eq!(sup.on_child_exit(1, &ExitReason::Normal, t0), ignore(&[]));
    assert_eq!(sup.stop_all(), [3, 2, 0]);
    assert!(sup.stop_all().is_empty());
}

#[test]
#[should_panic(expected = "out of range")]
fn an_exit_for_an_unknown_child_index_is_a_bug() {
    let mut sup = lax(OneForOne, &[Permanent]);
    sup.on_child_exit(1, &crash(), Instant::now());
}

#[test]
#[should_panic(expected = "must be unique")]
fn child_names_must_be_unique_as_in_otp() {
    SupervisorCore::new(
        OneForOne,
        LAX,
        vec![
            ChildSpec::new("flusher", Permanent),
            ChildSpec::new("flusher", Transient),
        ],
    );
}
