//! One watch stream: the changes after a revision, one JSON event a line, until the test cuts
//! the watches, the history it needs is compacted away, or its `timeoutSeconds` run out.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::query::Selectors;
use super::resources::Resource;
use super::{status, Shared, State};

/// Where a watch starts and what it was asked for.
pub(super) struct Params {
    /// `resourceVersion`: none (or `0`) starts with a synthetic `ADDED` for every object there is.
    pub from: Option<u64>,
    /// `allowWatchBookmarks=true`.
    pub bookmarks: bool,
    /// `sendInitialEvents=true`: a bookmark annotated `k8s.io/initial-events-end` follows the
    /// synthetic `ADDED` events (when bookmarks are allowed), as for a streaming list.
    pub initial_events_end: bool,
    pub timeout: Option<Duration>,
}

pub(super) struct Watch {
    shared: Arc<Shared>,
    resource: &'static Resource,
    namespace: Option<String>,
    selectors: Selectors,
    params: Params,
    /// The revision every change up to which has been sent; none before the first lines.
    position: Option<u64>,
    /// The `cut_watches` and `bookmark` counts when the watch opened or last sent a bookmark.
    cuts: u64,
    bookmarks: u64,
    pulse: tokio::sync::watch::Receiver<()>,
    deadline: Option<Instant>,
    done: bool,
}

/// What a look at the state gives a watch: lines to send, nothing yet, or the end.
enum Step {
    Send(Vec<u8>),
    Wait,
    End(Option<Vec<u8>>),
}

impl Watch {
    pub fn open(
        shared: Arc<Shared>,
        resource: &'static Resource,
        namespace: Option<String>,
        selectors: Selectors,
        params: Params,
    ) -> Watch {
        let (cuts, bookmarks) = {
            let state = shared.lock();
            (state.cuts, state.bookmarks)
        };
        let pulse = shared.pulse.subscribe();
        let deadline = params.timeout.map(|t| Instant::now() + t);
        Watch {
            shared,
            resource,
            namespace,
            selectors,
            params,
            position: None,
            cuts,
            bookmarks,
            pulse,
            deadline,
            done: false,
        }
    }

    /// The next chunk of the stream: one or more event lines; none once the stream has ended.
    pub async fn next(&mut self) -> Option<Bytes> {
        while !self.done {
            // Marked seen before the state is read, so a change made after the read wakes us.
            self.pulse.borrow_and_update();
            let shared = self.shared.clone();
            let step = self.step(&shared.lock());
            match step {
                Step::Send(lines) => return Some(lines.into()),
                Step::End(last) => {
                    self.done = true;
                    return last.map(Bytes::from);
                }
                Step::Wait => {}
            }
            let deadline = self.deadline;
            let timed_out = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.pulse.changed() => if changed.is_err() { return None },
                () = timed_out => return None,
            }
        }
        None
    }

    fn step(&mut self, state: &State) -> Step {
        if state.cuts != self.cuts {
            return Step::End(None);
        }
        let store = &state.store;
        let mut lines = Vec::new();
        let namespace = self.namespace.as_deref();
        let position = match (self.position, self.params.from) {
            (Some(position), _) => position,
            (None, Some(from)) => from,
            (None, None) => {
                for object in store
                    .list(self.resource, namespace)
                    .filter(|o| self.selectors.matches(o))
                {
                    push_line(
                        &mut lines,
                        "ADDED",
                        with_type(self.resource, object.clone()),
                    );
                }
                if self.params.initial_events_end && self.params.bookmarks {
                    let mut mark = bookmark(self.resource, store.revision());
                    mark["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                    push_line(&mut lines, "BOOKMARK", mark);
                }
                store.revision()
            }
        };
        match store.changes_after(position, self.resource, namespace) {
            Err(expired) => {
                let message = format!(
                    "too old resource version: {position} ({})",
                    expired.compacted
                );
                push_line(&mut lines, "ERROR", status(410, &message));
                return Step::End(Some(lines));
            }
            Ok(changes) => {
                for change in changes.filter(|c| self.selectors.matches(&c.object)) {
                    push_line(
                        &mut lines,
                        change.change_type.as_str(),
                        with_type(self.resource, change.object.clone()),
                    );
                }
            }
        }
        self.position = Some(position.max(store.revision()));
        if self.params.bookmarks && state.bookmarks != self.bookmarks {
            self.bookmarks = state.bookmarks;
            push_line(
                &mut lines,
                "BOOKMARK",
                bookmark(self.resource, store.revision()),
            );
        }
        if lines.is_empty() {
            Step::Wait
        } else {
            Step::Send(lines)
        }
    }
}

/// A bookmark: an object of the watched kind with nothing but `metadata.resourceVersion`.
fn bookmark(resource: &Resource, revision: u64) -> Value {
    json!({
        "kind": resource.kind,
        "apiVersion": resource.api_version,
        "metadata": {"resourceVersion": revision.to_string()},
    })
}

/// Watch events carry `kind` and `apiVersion` on the object, list items do not.
fn with_type(resource: &Resource, mut object: Value) -> Value {
    object["kind"] = json!(resource.kind);
    object["apiVersion"] = json!(resource.api_version);
    object
}

fn push_line(lines: &mut Vec<u8>, event_type: &str, object: Value) {
    let event = json!({"type": event_type, "object": object});
    serde_json::to_writer(&mut *lines, &event).expect("JSON values serialize");
    lines.push(b'\n');
}
