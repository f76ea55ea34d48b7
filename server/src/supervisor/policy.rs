//! The vocabulary of supervision: restart strategies, child restart policies and exit reasons.
//!
//! The names and meanings are OTP's (`supervisor` in STDLIB); configuration spells them in
//! snake case, as Erlang does (`one_for_one`, `transient`).

use std::fmt;

/// Which children a supervisor restarts when one of them must be restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Only the child that exited is restarted; its siblings are not touched.
    OneForOne,
    /// Every other child is stopped, then all children are started again.
    OneForAll,
    /// The children started after the one that exited are stopped, then it and they are
    /// started again; the children started before it are not touched.
    RestForOne,
}

impl Strategy {
    /// The name configuration and the admin API use (`one_for_one`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::OneForOne => "one_for_one",
            Strategy::OneForAll => "one_for_all",
            Strategy::RestForOne => "rest_for_one",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a child is restarted after it exits, depending on how it exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Always restarted, whatever the exit reason.
    Permanent,
    /// Restarted only after an abnormal exit (a crash).
    Transient,
    /// Never restarted; once it exits it is gone from its supervisor for good.
    Temporary,
}

impl RestartPolicy {
    /// OTP: permanent always; transient only after an abnormal exit (Crashed); temporary never.
    pub fn restarts_after(self, reason: &ExitReason) -> bool {
        match self {
            RestartPolicy::Permanent => true,
            // OTP treats `normal`, `shutdown` and `{shutdown, _}` as normal exits for transient
            // children; everything else is abnormal.
            RestartPolicy::Transient => reason.is_abnormal(),
            RestartPolicy::Temporary => false,
        }
    }

    /// The name configuration and the admin API use (`permanent`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Permanent => "permanent",
            RestartPolicy::Transient => "transient",
            RestartPolicy::Temporary => "temporary",
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a child exited, as its supervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The child finished on its own (an entity passivated, was stopped or deleted).
    Normal,
    /// The child was asked to stop (by its supervisor, or because the server shuts down).
    Shutdown,
    /// The child failed: a handler panicked or returned an error. The text says why, for logs
    /// and the admin API.
    Crashed(String),
}

impl ExitReason {
    /// Whether this is an abnormal exit in OTP's sense: only a crash is.
    pub fn is_abnormal(&self) -> bool {
        matches!(self, ExitReason::Crashed(_))
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Normal => f.write_str("normal"),
            ExitReason::Shutdown => f.write_str("shutdown"),
            ExitReason::Crashed(cause) => write!(f, "crashed: {cause}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crashed() -> ExitReason {
        ExitReason::Crashed("boom".to_owned())
    }

    #[test]
    fn permanent_child_is_restarted_after_every_exit_reason() {
        let policy = RestartPolicy::Permanent;
        assert!(policy.restarts_after(&ExitReason::Normal));
        assert!(policy.restarts_after(&ExitReason::Shutdown));
        assert!(policy.restarts_after(&crashed()));
    }

    #[test]
    fn transient_child_is_restarted_only_after_an_abnormal_exit() {
        let policy = RestartPolicy::Transient;
        assert!(!policy.restarts_after(&ExitReason::Normal));
        assert!(!policy.restarts_after(&ExitReason::Shutdown));
        assert!(policy.restarts_after(&crashed()));
    }

    #[test]
    fn temporary_child_is_never_restarted() {
        let policy = RestartPolicy::Temporary;
        assert!(!policy.restarts_after(&ExitReason::Normal));
        assert!(!policy.restarts_after(&ExitReason::Shutdown));
        assert!(!policy.restarts_after(&crashed()));
    }

    #[test]
    fn only_a_crash_is_an_abnormal_exit() {
        assert!(!ExitReason::Normal.is_abnormal());
        assert!(!ExitReason::Shutdown.is_abnormal());
        assert!(crashed().is_abnormal());
    }

    #[test]
    fn strategies_and_policies_are_spelled_in_snake_case_as_in_erlang() {
        for strategy in [
            Strategy::OneForOne,
            Strategy::OneForAll,
            Strategy::RestForOne,
        ] {
            let json = serde_json::to_string(&strategy).unwrap();
            assert_eq!(json, format!("\"{}\"", strategy.as_str()));
            assert_eq!(serde_json::from_str::<Strategy>(&json).unwrap(), strategy);
        }
        for policy in [
            RestartPolicy::Permanent,
            RestartPolicy::Transient,
            RestartPolicy::Temporary,
        ] {
            let json = serde_json::to_string(&policy).unwrap();
            assert_eq!(json, format!("\"{}\"", policy.as_str()));
            assert_eq!(
                serde_json::from_str::<RestartPolicy>(&json).unwrap(),
                policy
            );
        }
        assert_eq!(Strategy::RestForOne.to_string(), "rest_for_one");
        assert_eq!(ExitReason::Crashed("x".into()).to_string(), "crashed: x");
    }
}
