//! What the admin API returns: deployed behaviours; dead letters (durable messages the
//! server gave up on) and their table for people (`statehouse dead-letters`); and the
//! supervision tree and its rendering as an indented tree for people (`statehouse tree`);
//! the server's stats and their table for people (`statehouse stats`). `--json` prints the
//! same data as JSON.

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

/// The server's figures at one moment, as `statehouse stats` prints them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerStats {
    pub uptime_ms: u64,
    pub shards: u32,
    /// Entities in the shards' directories: running on a task or hibernating.
    pub entities_active: u64,
    /// Of those, the ones hibernating (no task until their next message).
    pub entities_hibernating: u64,
    /// The server process's resident set; `None` where the server's system does not say.
    pub resident_bytes: Option<u64>,
    /// What the server's allocator has handed out and not got back; `None` without a probe.
    pub allocated_bytes: Option<u64>,
    /// The pages the server's allocator holds from the system.
    pub allocator_resident_bytes: Option<u64>,
    /// Batches committed since the server started.
    pub commits: u64,
    /// Group-commit rounds (one journal write each) and journal `fdatasync`s.
    pub journal_rounds: u64,
    pub journal_fsyncs: u64,
    pub journal_bytes_written: u64,
    pub checkpoints: u64,
    /// Memory held by committed writes not yet checkpointed into the state store.
    pub overlay_bytes: u64,
    /// Disk taken: the state store's directory and the journal's segments.
    pub state_disk_bytes: u64,
    pub journal_disk_bytes: u64,
    pub journal_segments: u64,
    /// Stored replies past their retention window that passive entities forgot when the
    /// server's sweep asked them.
    pub replies_forgotten: u64,
}

impl From<statehouse_proto::v1::ServerStatsResponse> for ServerStats {
    fn from(wire: statehouse_proto::v1::ServerStatsResponse) -> Self {
        ServerStats {
            uptime_ms: wire.uptime_ms,
            shards: wire.shards,
            entities_active: wire.entities_active,
            entities_hibernating: wire.entities_hibernating,
            resident_bytes: wire.resident_bytes,
            allocated_bytes: wire.allocated_bytes,
            allocator_resident_bytes: wire.allocator_resident_bytes,
            commits: wire.commits,
            journal_rounds: wire.journal_rounds,
            journal_fsyncs: wire.journal_fsyncs,
            journal_bytes_written: wire.journal_bytes_written,
            checkpoints: wire.checkpoints,
            overlay_bytes: wire.overlay_bytes,
            state_disk_bytes: wire.state_disk_bytes,
            journal_disk_bytes: wire.journal_disk_bytes,
            journal_segments: wire.journal_segments,
            replies_forgotten: wire.replies_forgotten,
        }
    }
}

impl ServerStats {
    /// Resident bytes per active entity: the whole process's memory (sled's cache, the
    /// runtime, buffers) divided by the active entities, so an upper bound on what one costs.
    pub fn resident_bytes_per_active_entity(&self) -> Option<u64> {
        let resident = self.resident_bytes?;
        resident.checked_div(self.entities_active)
    }

    /// The stats as aligned `name  value` lines for people.
    pub fn render(&self) -> String {
        let unknown = || "unknown".to_owned();
        let bytes = |b: Option<u64>| b.map_or_else(unknown, human_bytes);
        let mut rows: Vec<(&str, String)> = vec![
            ("uptime", format!("{:.1} s", self.uptime_ms as f64 / 1000.0)),
            ("shards", self.shards.to_string()),
            ("entities active", self.entities_active.to_string()),
            ("  hibernating", self.entities_hibernating.to_string()),
            ("memory resident", bytes(self.resident_bytes)),
        ];
        if let Some(per_entity) = self.resident_bytes_per_active_entity() {
            rows.push(("  per active entity", human_bytes(per_entity)));
        }
        rows.extend([
            ("  allocated", bytes(self.allocated_bytes)),
            ("  allocator resident", bytes(self.allocator_resident_bytes)),
            ("  not yet checkpointed", human_bytes(self.overlay_bytes)),
            ("commits", self.commits.to_string()),
            ("journal rounds", self.journal_rounds.to_string()),
            ("journal fsyncs", self.journal_fsyncs.to_string()),
            ("journal written", human_bytes(self.journal_bytes_written)),
            ("checkpoints", self.checkpoints.to_string()),
            ("replies forgotten", self.replies_forgotten.to_string()),
            ("disk state", human_bytes(self.state_disk_bytes)),
            (
                "disk journal",
                format!(
                    "{} in {} segments",
                    human_bytes(self.journal_disk_bytes),
                    self.journal_segments
                ),
            ),
        ]);
        let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (name, value) in rows {
            let _ = writeln!(out, "{name:<width$}  {value}");
        }
        out
    }
}

/// `bytes` in B, KiB, MiB or GiB with one decimal (exact bytes below 1 KiB).
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 3] = ["KiB", "MiB", "GiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
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

    fn stats() -> ServerStats {
        ServerStats {
            uptime_ms: 61_500,
            shards: 16,
            entities_active: 1000,
            entities_hibernating: 900,
            resident_bytes: Some(3 * 1024 * 1024),
            allocated_bytes: Some(1536),
            allocator_resident_bytes: None,
            commits: 5,
            journal_rounds: 4,
            journal_fsyncs: 3,
            journal_bytes_written: 512,
            checkpoints: 2,
            overlay_bytes: 0,
            state_disk_bytes: 5 * 1024 * 1024 * 1024,
            journal_disk_bytes: 64 * 1024 * 1024,
            journal_segments: 1,
            replies_forgotten: 7,
        }
    }

    #[test]
    fn bytes_print_in_the_largest_unit_below_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024 * 1024), "5120.0 GiB");
    }

    #[test]
    fn stats_render_aligned_with_the_cost_per_active_entity() {
        let rendered = stats().render();
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(lines[0], "uptime                  61.5 s");
        assert!(
            lines.contains(&"entities active         1000"),
            "{rendered}"
        );
        assert!(lines.contains(&"  hibernating           900"), "{rendered}");
        assert!(lines.contains(&"replies forgotten       7"), "{rendered}");
        // 3 MiB over 1000 entities.
        assert!(
            lines.contains(&"  per active entity     3.1 KiB"),
            "{rendered}"
        );
        assert!(
            lines.contains(&"  allocator resident    unknown"),
            "{rendered}"
        );
        assert!(
            lines.contains(&"disk journal            64.0 MiB in 1 segments"),
            "{rendered}"
        );

        let idle = ServerStats {
            entities_active: 0,
            ..stats()
        };
        assert_eq!(idle.resident_bytes_per_active_entity(), None);
        assert!(!idle.render().contains("per active entity"));
    }
}
