//! What the server reports about itself (`AdminService.ServerStats`, `statehouse stats`):
//! its entities, its memory and its storage, read at the moment of asking.
//!
//! **Owns**: [`ServerStats`], reading the process's resident memory (Linux `/proc`), and the
//! [`AllocatorProbe`] hook through which the binary reports its allocator's own figures (the
//! library does not choose the allocator; `statehouse-server` uses jemalloc).
//! **May call**: `shard/` (entity counts, the store's usage).

use std::time::{Duration, Instant};

use crate::shard::Shards;
use crate::storage::{DiskUsage, StoreError, StoreStats};

/// What the global allocator says of itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocatorStats {
    /// Bytes handed out and not yet freed.
    pub allocated_bytes: u64,
    /// Bytes in the pages the allocator holds from the system, free or not.
    pub resident_bytes: u64,
}

/// Asks the global allocator for its figures; `None` if it cannot say.
pub type AllocatorProbe = fn() -> Option<AllocatorStats>;

/// The server's figures at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStats {
    pub uptime: Duration,
    pub shards: u32,
    /// Entities in the shards' directories: running on a task or hibernating.
    pub entities_active: u64,
    /// Of those, the ones hibernating (no task until their next message).
    pub entities_hibernating: u64,
    /// The process's resident set, `None` where the system does not say (not Linux).
    pub resident_bytes: Option<u64>,
    /// The allocator's figures, `None` without a probe.
    pub allocator: Option<AllocatorStats>,
    /// Stored replies past their window that passive entities forgot, asked by the sweep.
    pub replies_forgotten: u64,
    pub store: StoreStats,
    pub disk: DiskUsage,
}

/// Reads the figures of a running server.
pub struct StatsSource {
    started: Instant,
    allocator: Option<AllocatorProbe>,
}

impl StatsSource {
    /// Counts uptime from now.
    pub fn new(allocator: Option<AllocatorProbe>) -> Self {
        StatsSource {
            started: Instant::now(),
            allocator,
        }
    }

    /// The figures now. Counting entities takes each shard's lock only to read its
    /// directory's length; the disk is measured on the blocking path.
    pub async fn collect(&self, shards: &Shards) -> Result<ServerStats, StoreError> {
        let (store, disk) = shards.store_usage().await?;
        let (entities_active, entities_hibernating) = shards.entity_counts();
        Ok(ServerStats {
            uptime: self.started.elapsed(),
            shards: shards.shard_count(),
            entities_active,
            entities_hibernating,
            resident_bytes: resident_bytes(),
            allocator: self.allocator.and_then(|probe| probe()),
            replies_forgotten: shards.replies_forgotten(),
            store,
            disk,
        })
    }
}

/// `VmRSS` of `/proc/self/status`, in bytes.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib = line
        .trim_start_matches("VmRSS:")
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss_in_bytes() {
        let status = "Name:\tstatehouse\nVmPeak:\t  9000 kB\nVmRSS:\t   1234 kB\nThreads:\t8\n";
        assert_eq!(parse_vm_rss(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tlots kB\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_a_resident_set() {
        assert!(resident_bytes().is_some_and(|bytes| bytes > 0));
    }
}
