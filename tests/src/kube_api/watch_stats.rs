//! Per-watch counts of the events the test API server delivered: what each watch request
//! (user, resource, namespace, selectors) cost the server, split by object name.
//!
//! An event counts as delivered once the server has handed it to the watch's response stream
//! (ADDED, MODIFIED, DELETED, ERROR; bookmarks are counted apart). Counts are exact: each is
//! taken under one lock per event, never sampled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What one watch request asked for, and what it was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchStats {
    pub user: String,
    /// The resource's plural, e.g. `leases`.
    pub resource: String,
    /// `None` for a watch across all namespaces.
    pub namespace: Option<String>,
    pub field_selector: Option<String>,
    pub label_selector: Option<String>,
    /// Whether the watch is still streaming.
    pub open: bool,
    /// Events delivered (not bookmarks), in total and per object name.
    pub events: u64,
    pub events_by_name: HashMap<String, u64>,
    pub bookmarks: u64,
}

#[derive(Debug)]
pub(crate) struct WatchRecord {
    stats: Mutex<WatchStats>,
}

impl WatchRecord {
    fn stats(&self) -> std::sync::MutexGuard<'_, WatchStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one delivered event about the object `name`.
    pub(crate) fn delivered(&self, name: &str) {
        let mut s = self.stats();
        s.events += 1;
        *s.events_by_name.entry(name.to_string()).or_default() += 1;
    }

    pub(crate) fn bookmark(&self) {
        self.stats().bookmarks += 1;
    }
}

/// Marks its watch closed when the watch's task ends (however it ends).
#[derive(Debug)]
pub(crate) struct OpenWatch(pub(crate) Arc<WatchRecord>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.stats().open = false;
    }
}

/// Every watch the server has started (since the last reset).
#[derive(Debug, Default)]
pub(crate) struct WatchLog {
    records: Mutex<Vec<Arc<WatchRecord>>>,
}

impl WatchLog {
    fn records(&self) -> std::sync::MutexGuard<'_, Vec<Arc<WatchRecord>>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn start(
        &self,
        user: &str,
        resource: &str,
        namespace: Option<&str>,
        field_selector: Option<&str>,
        label_selector: Option<&str>,
    ) -> OpenWatch {
        let record = Arc::new(WatchRecord {
            stats: Mutex::new(WatchStats {
                user: user.to_string(),
                resource: resource.to_string(),
                namespace: namespace.map(str::to_string),
                field_selector: field_selector.map(str::to_string),
                label_selector: label_selector.map(str::to_string),
                open: true,
                events: 0,
                events_by_name: HashMap::new(),
                bookmarks: 0,
            }),
        });
        self.records().push(record.clone());
        OpenWatch(record)
    }

    pub(crate) fn snapshot(&self) -> Vec<WatchStats> {
        self.records().iter().map(|r| r.stats().clone()).collect()
    }

    /// Forgets closed watches and zeroes the counts of open ones (to count from a point on).
    pub(crate) fn reset(&self) {
        let mut records = self.records();
        records.retain(|r| r.stats().open);
        for r in records.iter() {
            let mut s = r.stats();
            s.events = 0;
            s.events_by_name.clear();
            s.bookmarks = 0;
        }
    }
}
