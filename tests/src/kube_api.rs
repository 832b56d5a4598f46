//! A STAND-IN for the Kubernetes API server, which cannot run on the test machines: a real
//! HTTP/1.1 server speaking the API's list/watch protocol over objects the test puts in, so
//! ward-control's Kubernetes client (kube-rs) runs against it unchanged.
//!
//! What it implements, as the API server does:
//! - list and watch of Namespaces (`/api/v1/namespaces`), Pods (`/api/v1/pods`), Services
//!   (`/api/v1/services`), EndpointSlices (`/apis/discovery.k8s.io/v1/endpointslices`),
//!   NetworkPolicies (`/apis/networking.k8s.io/v1/networkpolicies`) and ward Policies
//!   (`/apis/ward.dev/v1/policies`), cluster-wide and, for the namespaced ones, under
//!   `/namespaces/<ns>/`; GET of one object;
//! - one resourceVersion counter (etcd's revision) bumped by every change and stamped on the
//!   object; `metadata.uid` and `metadata.creationTimestamp` filled in when absent;
//! - LIST answers every object at the current revision, without `kind`/`apiVersion` on the items;
//! - WATCH (`watch=true`) streams one `{"type","object"}` JSON line per change after
//!   `resourceVersion` (none or `0`: a synthetic `ADDED` per object first, and with
//!   `sendInitialEvents=true` the `k8s.io/initial-events-end` bookmark), bookmarks on
//!   [`KubeApi::bookmark`] when `allowWatchBookmarks=true`, an `ERROR` Status `410 Expired` for a
//!   revision older than the last [`KubeApi::compact_and_cut_watches`], and ends at `timeoutSeconds`;
//! - equality-based `labelSelector`/`fieldSelector` (set-based ones answer 400);
//! - POST of Events (`v1` and `events.k8s.io/v1`) and PATCH/PUT of an Event, recorded for
//!   [`KubeApi::events`]; PATCH/PUT of `.../status`, merged into the object (a `MODIFIED`
//!   change) and recorded for [`KubeApi::status_writes`];
//! - POST of a `TokenReview` (`/apis/authentication.k8s.io/v1/tokenreviews`), answered from the
//!   tokens the test issued with [`KubeApi::issue_token`]: authenticated, with the token's
//!   service account and node, when the token is known and was issued for one of the review's
//!   audiences; not authenticated otherwise (as the API server answers an unknown, expired or
//!   other audience's token);
//! - a `Status` body with 404 for anything else.
//!
//! What it does not: authentication of its own clients, authorization, admission, validation
//! against a schema, create/update/delete through HTTP (the test changes objects with
//! [`KubeApi::apply`] and [`KubeApi::delete`]), paging (`limit` is accepted and everything is answered, with no
//! `continue`), `resourceVersionMatch` (accepted and ignored), set-based selectors, a watch's
//! `DELETED` for an object that stops matching its selector, HTTP/2 and TLS.

mod query;
mod resources;
mod server;
mod store;
mod watch;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde_json::{json, Value};

use store::Store;

/// The running stand-in; clones share it, and it stops when the last one is dropped.
#[derive(Clone)]
pub struct KubeApi {
    server: Arc<Server>,
}

/// The server thread and what the test side shares with it.
struct Server {
    shared: Arc<Shared>,
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The state behind the lock, and the pulse every change sends so open watches look again.
struct Shared {
    state: Mutex<State>,
    pulse: tokio::sync::watch::Sender<()>,
}

/// A service account token the stand-in vouches for: whose, for which audience, bound to which
/// node.
#[derive(Clone)]
struct IssuedToken {
    username: String,
    audience: String,
    node: String,
}

#[derive(Default)]
struct State {
    store: Store,
    tokens: std::collections::BTreeMap<String, IssuedToken>,
    requests: Vec<String>,
    events: Vec<Value>,
    status_writes: Vec<Value>,
    failures: Failures,
    /// How many times the watches were cut, and bookmarks asked for: a watch compares these
    /// with the counts it opened with (or last acted on).
    cuts: u64,
    bookmarks: u64,
}

/// The next `remaining` requests answer `code`.
#[derive(Default)]
struct Failures {
    remaining: usize,
    code: u16,
}

impl Failures {
    fn take_one(&mut self) -> Option<u16> {
        (self.remaining > 0).then(|| {
            self.remaining -= 1;
            self.code
        })
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in a test thread holding the lock leaves the state as consistent as ever.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl KubeApi {
    /// Starts the server on 127.0.0.1 (a free port) on its own thread and tokio runtime.
    pub fn start() -> KubeApi {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("bind the stand-in API server to 127.0.0.1: {e}"));
        let url = format!(
            "http://{}",
            listener
                .local_addr()
                .expect("a bound socket has an address")
        );
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            pulse: tokio::sync::watch::channel(()).0,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("a tokio runtime for the stand-in API server: {e}"));
        let thread = std::thread::Builder::new()
            .name("kube-api".into())
            .spawn({
                let shared = shared.clone();
                move || runtime.block_on(server::serve(listener, shared, stopped))
            })
            .unwrap_or_else(|e| panic!("start the stand-in API server's thread: {e}"));
        KubeApi {
            server: Arc::new(Server {
                shared,
                url,
                stop: Some(stop),
                thread: Some(thread),
            }),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.server.url.clone()
    }

    /// Writes a kubeconfig whose current context reaches this server as a user with no
    /// credentials (kube's parser needs `current-context`, and a context naming its cluster).
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: stand-in\n  cluster:\n    server: {}\n\
             users:\n\
             - name: anonymous\n  user: {{}}\n\
             contexts:\n\
             - name: stand-in\n  context:\n    cluster: stand-in\n    user: anonymous\n\
             current-context: stand-in\n",
            self.url()
        );
        std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Creates or replaces the object with `object`'s apiVersion, kind, namespace and name, and
    /// returns it as stored (resourceVersion, and uid and creationTimestamp when absent).
    pub fn apply(&self, object: Value) -> Value {
        let stored = self.server.shared.lock().store.apply(object);
        self.server.shared.pulse.send_replace(());
        stored
    }

    /// Deletes the object; panics when there is none.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) {
        let deleted = self
            .server
            .shared
            .lock()
            .store
            .delete(api_version, kind, namespace, name);
        if deleted.is_none() {
            panic!("delete {api_version} {kind} {namespace:?}/{name}: no such object");
        }
        self.server.shared.pulse.send_replace(());
    }

    /// The stored object, if there is one.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let resource = resources::Resource::of(api_version, kind)?;
        self.server
            .shared
            .lock()
            .store
            .get(resource, namespace, name)
            .cloned()
    }

    /// Ends every open watch stream at once, as an API server restart does.
    pub fn cut_watches(&self) {
        self.server.shared.lock().cuts += 1;
        self.server.shared.pulse.send_replace(());
    }

    /// An API server restart after etcd compacted its history: every open watch ends, and a
    /// watch from an older revision than the current one then gets `410 Expired` (a watch from
    /// the current revision is still fine). Both at once, under one lock: an open watch never
    /// sees the compaction (a real API server's watch cache keeps serving its open watches).
    pub fn compact_and_cut_watches(&self) {
        let mut state = self.server.shared.lock();
        state.store.compact();
        state.cuts += 1;
        drop(state);
        self.server.shared.pulse.send_replace(());
    }

    /// Sends every open watch that allows bookmarks a BOOKMARK at the current revision.
    pub fn bookmark(&self) {
        self.server.shared.lock().bookmarks += 1;
        self.server.shared.pulse.send_replace(());
    }

    /// The next `n` requests, whatever they are, answer HTTP `status` with a `Status` body.
    ///
    /// kube's client retries 429, 503 and 504 by itself (`Config::default_retry`, up to 15
    /// times): a watcher sees only other codes, 500 say, as `WatchStartFailed`/`InitialListFailed`.
    pub fn fail_next(&self, n: usize, status: u16) {
        self.server.shared.lock().failures = Failures {
            remaining: n,
            code: status,
        };
    }

    /// A token of service account `<namespace>/<name>` `account` for `audience`, bound to a pod
    /// on `node`, as kubelet projects one (a JWT-shaped string; its content is the stand-in's
    /// own): a `TokenReview` of it answers that service account with the node in
    /// `authentication.kubernetes.io/node-name`.
    pub fn issue_token(&self, account: &str, audience: &str, node: &str) -> String {
        let (namespace, name) = account.split_once('/').expect("<namespace>/<name>");
        let mut state = self.server.shared.lock();
        let token = format!(
            "eyJhbGciOiJSUzI1NiJ9.c3RhbmQtaW4tdG9rZW4tMDAw{}.c2lnbmF0dXJl",
            state.tokens.len()
        );
        state.tokens.insert(
            token.clone(),
            IssuedToken {
                username: format!("system:serviceaccount:{namespace}:{name}"),
                audience: audience.to_owned(),
                node: node.to_owned(),
            },
        );
        token
    }

    /// Every request so far as `METHOD path?query`, in order.
    pub fn requests(&self) -> Vec<String> {
        self.server.shared.lock().requests.clone()
    }

    /// Every Event written (POST, PATCH or PUT), as its body, in order.
    pub fn events(&self) -> Vec<Value> {
        self.server.shared.lock().events.clone()
    }

    /// Every write of a `status` subresource, as its body, in order.
    pub fn status_writes(&self) -> Vec<Value> {
        self.server.shared.lock().status_writes.clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // Gone already only if the server thread ended, which the join below reports.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() && !std::thread::panicking() {
                panic!("the stand-in API server's thread panicked");
            }
        }
    }
}

/// A `Status` object, the body of every error the API server answers.
fn status(code: u16, message: &str) -> Value {
    let reason = match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        410 => "Expired",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    };
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

#[cfg(test)]
mod tests;
