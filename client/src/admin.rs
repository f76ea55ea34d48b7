//! What the admin API returns: deployed behaviours, and the supervision tree as the admin API returns it, and its rendering as an indented tree
//! for people (`statehouse tree`); `--json` prints the same data as JSON.

use std::fmt::Write as _;

use serde::Serialize;

/// One supervisor, worker or entity in the server's supervision tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TreeNode {
    /// e.g. `root`, `shard-3`, `counter/visits`.
    pub name: String,
    /// `supervisor`, `worker` or `entity`.
    pub kind: String,
    /// The restart strategy of a supervisor (`one_for_one`, …); `None` for others.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// `running`, `backoff`, `quarantined`, `stopping`, …
    pub state: String,
    /// Restarts since the server started.
    pub restarts: u64,
    /// Restarts inside the current intensity window.
    pub restarts_in_window: u32,
    /// Messages waiting in an active entity's mailbox.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mailbox_len: Option<u64>,
    /// Why it last crashed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_crash: Option<String>,
    pub children: Vec<TreeNode>,
}

/// A behaviour the server serves, as `statehouse behaviours` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BehaviourInfo {
    pub name: String,
    /// Built into the server binary (one version, never deployed).
    pub builtin: bool,
    pub active_version: u32,
    /// `{version, deployed_at_ms}` of every stored version of a deployed type.
    pub versions: Vec<BehaviourVersion>,
}

/// One stored version of a deployed behaviour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BehaviourVersion {
    pub version: u32,
    pub deployed_at_ms: u64,
}

impl From<statehouse_proto::v1::BehaviourInfo> for BehaviourInfo {
    fn from(info: statehouse_proto::v1::BehaviourInfo) -> Self {
        BehaviourInfo {
            name: info.name,
            builtin: info.builtin,
            active_version: info.active_version,
            versions: info
                .versions
                .into_iter()
                .map(|v| BehaviourVersion {
                    version: v.version,
                    deployed_at_ms: v.deployed_at_ms,
                })
                .collect(),
        }
    }
}

impl From<statehouse_proto::v1::TreeNode> for TreeNode {
    fn from(node: statehouse_proto::v1::TreeNode) -> Self {
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        TreeNode {
            name: node.name,
            kind: node.kind,
            strategy: non_empty(node.strategy),
            state: node.state,
            restarts: node.restarts,
            restarts_in_window: node.restarts_in_window,
            mailbox_len: node.mailbox_len,
            last_crash: non_empty(node.last_crash),
            children: node.children.into_iter().map(TreeNode::from).collect(),
        }
    }
}

impl TreeNode {
    /// Finds a node by name anywhere below (or at) this one.
    pub fn find(&self, name: &str) -> Option<&TreeNode> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|child| child.find(name))
    }

    /// The tree drawn with box-drawing branches, one node a line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_into(&mut out, "", "");
        out
    }

    fn render_into(&self, out: &mut String, first_prefix: &str, rest_prefix: &str) {
        let _ = write!(out, "{first_prefix}{} [{}", self.name, self.kind);
        if let Some(strategy) = &self.strategy {
            let _ = write!(out, ", {strategy}");
        }
        let _ = write!(out, "] {}", self.state);
        if self.restarts > 0 {
            let _ = write!(
                out,
                ", restarts {} ({} in window)",
                self.restarts, self.restarts_in_window
            );
        }
        if let Some(len) = self.mailbox_len {
            let _ = write!(out, ", mailbox {len}");
        }
        if let Some(crash) = &self.last_crash {
            let _ = write!(out, ", last crash: {crash}");
        }
        out.push('\n');
        let count = self.children.len();
        for (index, child) in self.children.iter().enumerate() {
            let last = index + 1 == count;
            let branch = if last { "└─ " } else { "├─ " };
            let continuation = if last { "   " } else { "│  " };
            child.render_into(
                out,
                &format!("{rest_prefix}{branch}"),
                &format!("{rest_prefix}{continuation}"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, kind: &str, children: Vec<TreeNode>) -> TreeNode {
        TreeNode {
            name: name.into(),
            kind: kind.into(),
            strategy: None,
            state: "running".into(),
            restarts: 0,
            restarts_in_window: 0,
            mailbox_len: None,
            last_crash: None,
            children,
        }
    }

    #[test]
    fn renders_an_indented_tree() {
        let mut crashed = node("counter/a", "entity", vec![]);
        crashed.state = "quarantined".into();
        crashed.restarts = 4;
        crashed.restarts_in_window = 4;
        crashed.last_crash = Some("boom".into());
        let mut root = node(
            "root",
            "supervisor",
            vec![
                node("storage", "worker", vec![]),
                node("shard-0", "supervisor", vec![crashed]),
            ],
        );
        root.strategy = Some("one_for_one".into());
        let expected = [
            "root [supervisor, one_for_one] running",
            "├─ storage [worker] running",
            "└─ shard-0 [supervisor] running",
            "   └─ counter/a [entity] quarantined, restarts 4 (4 in window), last crash: boom",
        ];
        assert_eq!(root.render(), expected.join("\n") + "\n");
        assert_eq!(
            root.find("counter/a").map(|n| n.state.as_str()),
            Some("quarantined")
        );
    }
}
