//! The supervision tree as the admin API shows it.
//!
//! The runtime builds a [`TreeNode`] snapshot from its live supervisors and entities on request
//! (`SupervisionTree`); the gRPC layer converts it to protobuf and the CLI renders it. It is
//! plain data: building it takes no lock beyond what the runtime holds to read each node.

use super::policy::Strategy;

/// One node of the supervision tree: a supervisor, a worker (flusher, gRPC server) or an entity.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TreeNode {
    /// e.g. `root`, `shard-3`, `counter/visits`.
    pub name: String,
    /// Supervisor, worker or entity.
    pub kind: NodeKind,
    /// Set for supervisors only.
    pub strategy: Option<Strategy>,
    /// `running`, `hibernating`, `restarting`, `quarantined`, `backoff`, ...
    pub state: String,
    /// Total restarts so far.
    pub restarts: u64,
    /// Restarts inside the current intensity window.
    pub restarts_in_window: u32,
    /// Messages waiting, for entities.
    pub mailbox_len: Option<u64>,
    /// Why it last crashed, if it ever did.
    pub last_crash: Option<String>,
    /// Its children in start order (empty for workers and entities).
    pub children: Vec<TreeNode>,
}

/// What a [`TreeNode`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    /// Restarts its children by a [`Strategy`]; has children.
    Supervisor,
    /// A long-lived service task: the storage flusher, the timer service, the gRPC server.
    Worker,
    /// One active entity process.
    Entity,
}

impl TreeNode {
    /// A running supervisor with no children yet and no restarts.
    pub fn supervisor(name: impl Into<String>, strategy: Strategy) -> Self {
        TreeNode {
            strategy: Some(strategy),
            ..TreeNode::leaf(name, NodeKind::Supervisor)
        }
    }

    /// A running worker with no restarts.
    pub fn worker(name: impl Into<String>) -> Self {
        TreeNode::leaf(name, NodeKind::Worker)
    }

    /// A running entity with no restarts and an empty mailbox.
    pub fn entity(name: impl Into<String>) -> Self {
        TreeNode {
            mailbox_len: Some(0),
            ..TreeNode::leaf(name, NodeKind::Entity)
        }
    }

    /// This node and all below it, depth first, parents before children.
    pub fn walk(&self) -> Vec<&TreeNode> {
        let mut nodes = Vec::new();
        let mut pending = vec![self];
        while let Some(node) = pending.pop() {
            nodes.push(node);
            pending.extend(node.children.iter().rev());
        }
        nodes
    }

    fn leaf(name: impl Into<String>, kind: NodeKind) -> Self {
        TreeNode {
            name: name.into(),
            kind,
            strategy: None,
            state: "running".to_owned(),
            restarts: 0,
            restarts_in_window: 0,
            mailbox_len: None,
            last_crash: None,
            children: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TreeNode {
        let mut shard = TreeNode::supervisor("shard-0", Strategy::OneForOne);
        let mut entity = TreeNode::entity("counter/visits");
        entity.restarts = 2;
        entity.last_crash = Some("panicked: boom".to_owned());
        shard.children.push(entity);
        let mut root = TreeNode::supervisor("root", Strategy::OneForOne);
        root.children = vec![TreeNode::worker("flusher"), shard, TreeNode::worker("grpc")];
        root
    }

    #[test]
    fn walk_visits_parents_before_children_in_start_order() {
        let tree = sample();
        let names: Vec<&str> = tree.walk().iter().map(|n| n.name.as_str()).collect();
        assert_eq!(
            names,
            ["root", "flusher", "shard-0", "counter/visits", "grpc"]
        );
    }

    #[test]
    fn tree_serializes_kinds_and_strategies_in_snake_case() {
        let json = serde_json::to_value(sample()).unwrap();
        assert_eq!(json["strategy"], "one_for_one");
        assert_eq!(json["kind"], "supervisor");
        let entity = &json["children"][1]["children"][0];
        assert_eq!(entity["name"], "counter/visits");
        assert_eq!(entity["kind"], "entity");
        assert_eq!(entity["mailbox_len"], 0);
        assert_eq!(entity["restarts"], 2);
        assert_eq!(entity["last_crash"], "panicked: boom");
        assert_eq!(json["children"][0]["strategy"], serde_json::Value::Null);
    }
}
