//! What the admin API returns: deployed behaviours; dead letters (durable messages the
//! server gave up on) and their table for people (`statehouse dead-letters`); and the
//! supervision tree and its rendering as an indented tree for people (`statehouse tree`).
//! `--json` prints the same data as JSON.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::client::decode_value;
use crate::error::ClientError;

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

/// A message the server gave up on: its handling kept crashing, so it was set aside.
/// [`Client::redrive_dead_letter`](crate::Client::redrive_dead_letter) puts it back into the
/// entity's durable inbox; [`Client::discard_dead_letter`](crate::Client::discard_dead_letter)
/// drops it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    /// The type of the entity the message was addressed to.
    #[serde(rename = "type")]
    pub entity_type: String,
    /// The key of that entity.
    pub key: String,
    /// Identifies the dead letter within its entity.
    pub id: String,
    /// `timer`, `send`, `request` or `durable_cast`.
    pub kind: String,
    /// The message itself.
    pub message: Value,
    /// The last crash: why it could not be processed.
    pub reason: String,
    /// How many times it was tried.
    pub attempts: u32,
    /// When it became a dead letter, in Unix milliseconds.
    pub dead_at_ms: u64,
    /// Who sent it: `type/key` of the sending entity, `client`, or `timer:<name>`.
    pub origin: String,
}

/// One page of [`Client::list_dead_letters`](crate::Client::list_dead_letters).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetter>,
    /// The token for the next page, or `None` when this is the last page.
    pub next_page_token: Option<String>,
}

impl TryFrom<statehouse_proto::v1::DeadLetter> for DeadLetter {
    type Error = ClientError;

    fn try_from(letter: statehouse_proto::v1::DeadLetter) -> Result<Self, ClientError> {
        let message = decode_value(letter.message, || {
            format!(
                "list dead letters ({}/{} {})",
                letter.r#type, letter.key, letter.id
            )
        })?;
        Ok(DeadLetter {
            entity_type: letter.r#type,
            key: letter.key,
            id: letter.id,
            kind: letter.kind,
            message,
            reason: letter.reason,
            attempts: letter.attempts,
            dead_at_ms: letter.dead_at_ms,
            origin: letter.origin,
        })
    }
}

/// The longest reason [`render_dead_letters`] prints in full; longer ones are cut with `…`.
pub const DEAD_LETTER_REASON_WIDTH: usize = 60;

/// Dead letters as a table for people: a header, then one line each with the columns
/// `TYPE KEY ID KIND ATTEMPTS REASON`, aligned (the reason is last and cut at
/// [`DEAD_LETTER_REASON_WIDTH`] characters; line breaks in it become spaces).
pub fn render_dead_letters(letters: &[DeadLetter]) -> String {
    let header = ["TYPE", "KEY", "ID", "KIND", "ATTEMPTS", "REASON"].map(String::from);
    let rows: Vec<[String; 6]> = std::iter::once(header)
        .chain(letters.iter().map(|letter| {
            [
                letter.entity_type.clone(),
                letter.key.clone(),
                letter.id.clone(),
                letter.kind.clone(),
                letter.attempts.to_string(),
                one_line(&letter.reason, DEAD_LETTER_REASON_WIDTH),
            ]
        }))
        .collect();
    let mut widths = [0usize; 5];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row.iter()) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(widths.iter()) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        line.push_str(&row[5]);
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `text` on one line, at most `max` characters (the last one `…` when cut).
fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
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

    fn letter(key: &str, id: &str, reason: &str) -> DeadLetter {
        DeadLetter {
            entity_type: "crashy".into(),
            key: key.into(),
            id: id.into(),
            kind: "durable_cast".into(),
            message: serde_json::json!({"op": "poison"}),
            reason: reason.into(),
            attempts: 4,
            dead_at_ms: 1_700_000_000_000,
            origin: "client".into(),
        }
    }

    #[test]
    fn dead_letters_convert_from_the_wire_and_serialize_with_type() {
        let wire = statehouse_proto::v1::DeadLetter {
            r#type: "crashy".into(),
            key: "k".into(),
            id: "7".into(),
            kind: "durable_cast".into(),
            message: Some(statehouse_proto::value::json_to_proto(
                serde_json::json!({"op": "poison"}),
            )),
            reason: "boom".into(),
            attempts: 4,
            dead_at_ms: 1_700_000_000_000,
            origin: "client".into(),
        };
        let letter = DeadLetter::try_from(wire).unwrap();
        assert_eq!(letter, self::letter("k", "7", "boom"));
        let json = serde_json::to_value(&letter).unwrap();
        assert_eq!(json["type"], "crashy");
        assert_eq!(json["message"]["op"], "poison");
        assert_eq!(json["dead_at_ms"], 1_700_000_000_000u64);
        assert!(json.get("entity_type").is_none());
    }

    #[test]
    fn dead_letters_render_as_an_aligned_table() {
        let long = format!("line one\nline two {}", "x".repeat(100));
        let table = render_dead_letters(&[letter("a", "1", "boom"), letter("bbbb", "22", &long)]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert_eq!(lines[0], "TYPE    KEY   ID  KIND          ATTEMPTS  REASON");
        assert_eq!(lines[1], "crashy  a     1   durable_cast  4         boom");
        assert!(
            lines[2].starts_with("crashy  bbbb  22  durable_cast  4         line one line two x")
        );
        assert!(lines[2].ends_with('…'), "{table}");
        assert_eq!(
            lines[2].chars().count(),
            lines[1].chars().count() - "boom".len() + DEAD_LETTER_REASON_WIDTH
        );
        assert_eq!(render_dead_letters(&[]).lines().count(), 1);
    }

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
