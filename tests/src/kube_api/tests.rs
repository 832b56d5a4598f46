//! The stand-in over a plain HTTP/1.1 client on a std `TcpStream`, the way kube-rs speaks to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};

use super::KubeApi;

/// An open response: its status and headers read, its body still to come.
struct Response {
    code: u16,
    chunked: bool,
    length: Option<usize>,
    reader: BufReader<TcpStream>,
    /// The decoded body read and not yet handed out as a line.
    pending: Vec<u8>,
}

fn request(api: &KubeApi, method: &str, target: &str, body: Option<&Value>) -> Response {
    let address = api.url().trim_start_matches("http://").to_owned();
    let mut stream =
        TcpStream::connect(&address).unwrap_or_else(|e| panic!("connect to {address}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    let body = body.map(Value::to_string).unwrap_or_default();
    let content_type = if method == "PATCH" {
        "application/merge-patch+json"
    } else {
        "application/json"
    };
    write!(
        stream,
        "{method} {target} HTTP/1.1\r\nHost: {address}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
    let mut reader = BufReader::new(stream);
    let status_line = read_line(&mut reader);
    let code = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line {status_line:?}"));
    let (mut chunked, mut length) = (false, None);
    loop {
        let line = read_line(&mut reader);
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("header {line:?}"));
        match name.to_ascii_lowercase().as_str() {
            "transfer-encoding" => chunked = value.trim() == "chunked",
            "content-length" => length = value.trim().parse().ok(),
            _ => {}
        }
    }
    Response {
        code,
        chunked,
        length,
        reader,
        pending: Vec::new(),
    }
}

fn read_line(reader: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .expect("read a line of the response");
    line.trim_end_matches(['\r', '\n']).to_owned()
}

impl Response {
    /// The whole body as JSON.
    fn json(mut self) -> Value {
        let mut body = Vec::new();
        if self.chunked {
            while self.next_chunk() {}
            body = std::mem::take(&mut self.pending);
        } else {
            let length = self.length.expect("a body with a length");
            body.resize(length, 0);
            self.reader.read_exact(&mut body).expect("read the body");
        }
        serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)))
    }

    /// The next watch event, or none once the stream has ended.
    fn next_event(&mut self) -> Option<Value> {
        assert!(self.chunked, "a watch streams chunks");
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Some(serde_json::from_slice(&line).expect("an event line is JSON"));
            }
            if !self.next_chunk() {
                assert!(self.pending.is_empty(), "the stream ended mid-line");
                return None;
            }
        }
    }

    /// Reads one chunk into `pending`; false at the last (empty) chunk.
    fn next_chunk(&mut self) -> bool {
        let size = read_line(&mut self.reader);
        let size =
            usize::from_str_radix(&size, 16).unwrap_or_else(|_| panic!("chunk size {size:?}"));
        let mut chunk = vec![0; size + 2];
        self.reader.read_exact(&mut chunk).expect("read a chunk");
        self.pending.extend_from_slice(&chunk[..size]);
        size > 0
    }
}

fn pod(namespace: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
           "spec": {"nodeName": "n1"}})
}

fn event_summary(event: &Value) -> (String, String, String) {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (
        text(&event["type"]),
        text(&event["object"]["metadata"]["name"]),
        text(&event["object"]["metadata"]["resourceVersion"]),
    )
}

fn summary(t: &str, name: &str, rv: u64) -> (String, String, String) {
    (t.into(), name.into(), rv.to_string())
}

#[test]
fn a_list_answers_every_object_at_the_current_revision() {
    let api = KubeApi::start();
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}));
    let stored = api.apply(pod("a", "p"));
    api.apply(pod("b", "q"));
    assert_eq!(stored["metadata"]["resourceVersion"], "2");
    assert!(
        stored["metadata"]["uid"].is_string()
            && stored["metadata"]["creationTimestamp"].is_string()
    );

    let response = request(
        &api,
        "GET",
        "/api/v1/pods?limit=500&resourceVersion=0&resourceVersionMatch=NotOlderThan",
        None,
    );
    assert_eq!(response.code, 200);
    let list = response.json();
    assert_eq!(
        (&list["kind"], &list["apiVersion"]),
        (&json!("PodList"), &json!("v1"))
    );
    assert_eq!(list["metadata"]["resourceVersion"], "3");
    assert_eq!(list["metadata"].get("continue"), None);
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["metadata"], stored["metadata"]);
    assert_eq!(
        (items[0].get("kind"), items[0].get("apiVersion")),
        (None, None),
        "items carry no type"
    );

    let in_b = request(&api, "GET", "/api/v1/namespaces/b/pods", None).json();
    assert_eq!(in_b["items"][0]["metadata"]["name"], "q");
    let namespaces = request(&api, "GET", "/api/v1/namespaces", None).json();
    assert_eq!(namespaces["kind"], "NamespaceList");
    assert_eq!(namespaces["items"].as_array().map(Vec::len), Some(1));
    let selected = request(
        &api,
        "GET",
        "/api/v1/pods?fieldSelector=metadata.name%3Dq",
        None,
    )
    .json();
    assert_eq!(selected["items"].as_array().map(Vec::len), Some(1));
}

#[test]
fn a_watch_sends_every_change_after_its_revision() {
    let api = KubeApi::start();
    api.apply(pod("a", "p"));
    api.apply(pod("a", "q"));
    api.apply(json!({"apiVersion": "ward.dev/v1", "kind": "Policy", "metadata": {"name": "x", "namespace": "a"}}));
    let mut watch = request(
        &api,
        "GET",
        "/api/v1/pods?watch=true&resourceVersion=1&timeoutSeconds=30",
        None,
    );
    assert_eq!(watch.code, 200);
    let added = watch.next_event().expect("an event");
    assert_eq!(event_summary(&added), summary("ADDED", "q", 2));
    assert_eq!(
        (&added["object"]["kind"], &added["object"]["apiVersion"]),
        (&json!("Pod"), &json!("v1"))
    );

    api.apply(pod("a", "p"));
    assert_eq!(
        event_summary(&watch.next_event().expect("an event")),
        summary("MODIFIED", "p", 4)
    );
    api.delete("v1", "Pod", Some("a"), "q");
    assert_eq!(
        event_summary(&watch.next_event().expect("an event")),
        summary("DELETED", "q", 5)
    );
}

#[test]
fn a_watch_from_no_revision_starts_with_every_object() {
    let api = KubeApi::start();
    api.apply(pod("a", "p"));
    api.apply(pod("b", "q"));
    let target = "/api/v1/namespaces/a/pods?watch=1&resourceVersion=0&allowWatchBookmarks=true&sendInitialEvents=true";
    let mut watch = request(&api, "GET", target, None);
    assert_eq!(
        event_summary(&watch.next_event().expect("an event")),
        summary("ADDED", "p", 1)
    );
    let end = watch.next_event().expect("the initial-events-end bookmark");
    assert_eq!(event_summary(&end), summary("BOOKMARK", "", 2));
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
}

#[test]
fn a_watch_from_before_a_compaction_gets_410_expired() {
    let api = KubeApi::start();
    api.apply(pod("a", "p"));
    api.apply(pod("a", "q"));
    api.compact_and_cut_watches();
    let mut watch = request(
        &api,
        "GET",
        "/api/v1/pods?watch=true&resourceVersion=1",
        None,
    );
    let error = watch.next_event().expect("an ERROR event");
    assert_eq!(error["type"], "ERROR");
    assert_eq!(
        error["object"],
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "too old resource version: 1 (2)", "reason": "Expired", "code": 410})
    );
    assert_eq!(watch.next_event(), None, "the stream ends after the error");

    let mut current = request(
        &api,
        "GET",
        "/api/v1/pods?watch=true&resourceVersion=2",
        None,
    );
    api.apply(pod("a", "r"));
    assert_eq!(
        event_summary(&current.next_event().expect("an event")),
        summary("ADDED", "r", 3)
    );
}

#[test]
fn cutting_the_watches_ends_every_open_stream() {
    let api = KubeApi::start();
    let mut pods = request(
        &api,
        "GET",
        "/api/v1/pods?watch=true&resourceVersion=0",
        None,
    );
    let mut policies = request(&api, "GET", "/apis/ward.dev/v1/policies?watch=true", None);
    api.apply(pod("a", "p"));
    api.apply(json!({"apiVersion": "ward.dev/v1", "kind": "Policy", "metadata": {"name": "x", "namespace": "a"}}));
    assert_eq!(
        event_summary(&pods.next_event().expect("an event")),
        summary("ADDED", "p", 1)
    );
    assert_eq!(
        event_summary(&policies.next_event().expect("an event")),
        summary("ADDED", "x", 2)
    );
    api.cut_watches();
    assert_eq!(pods.next_event(), None);
    assert_eq!(policies.next_event(), None);

    let mut after = request(
        &api,
        "GET",
        "/api/v1/pods?watch=true&resourceVersion=2",
        None,
    );
    api.apply(pod("a", "q"));
    assert_eq!(
        event_summary(&after.next_event().expect("an event")),
        summary("ADDED", "q", 3),
        "a new watch is not cut"
    );
}

#[test]
fn bookmarks_go_to_watches_that_allow_them() {
    let api = KubeApi::start();
    let mut with = request(
        &api,
        "GET",
        "/api/v1/pods?watch=true&resourceVersion=0&allowWatchBookmarks=true",
        None,
    );
    let mut without = request(
        &api,
        "GET",
        "/api/v1/pods?watch=true&resourceVersion=0",
        None,
    );
    api.apply(pod("a", "p"));
    assert_eq!(
        event_summary(&with.next_event().expect("an event")),
        summary("ADDED", "p", 1)
    );
    assert_eq!(
        event_summary(&without.next_event().expect("an event")),
        summary("ADDED", "p", 1)
    );
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}));
    api.bookmark();
    let mark = with.next_event().expect("a bookmark");
    assert_eq!(
        mark,
        json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "2"}}})
    );
    api.apply(pod("a", "q"));
    assert_eq!(
        event_summary(&without.next_event().expect("an event")),
        summary("ADDED", "q", 3)
    );
}

#[test]
fn a_watch_ends_at_its_timeout() {
    let api = KubeApi::start();
    let mut watch = request(
        &api,
        "GET",
        "/api/v1/pods?watch=true&timeoutSeconds=1",
        None,
    );
    assert_eq!(watch.next_event(), None);
}

#[test]
fn failures_missing_paths_events_and_status_writes() {
    let api = KubeApi::start();
    api.fail_next(2, 503);
    for _ in 0..2 {
        let failed = request(&api, "GET", "/api/v1/pods", None);
        assert_eq!(failed.code, 503);
        assert_eq!(failed.json()["reason"], "ServiceUnavailable");
    }
    assert_eq!(request(&api, "GET", "/api/v1/pods", None).code, 200);
    let missing = request(&api, "GET", "/api/v1/endpoints", None);
    assert_eq!(missing.code, 404);
    assert_eq!(missing.json()["kind"], "Status");

    let event = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "note": "refused"});
    let created = request(
        &api,
        "POST",
        "/apis/events.k8s.io/v1/namespaces/a/events",
        Some(&event),
    );
    assert_eq!(created.code, 201);
    assert_eq!(api.events(), [event]);

    let policy = json!({"apiVersion": "ward.dev/v1", "kind": "Policy", "metadata": {"name": "x"},
                        "status": {"observed": 1}});
    api.apply(policy);
    let patch = json!({"status": {"accepted": false}});
    let patched = request(
        &api,
        "PATCH",
        "/apis/ward.dev/v1/policies/x/status",
        Some(&patch),
    );
    assert_eq!(patched.code, 200);
    assert_eq!(
        patched.json()["status"],
        json!({"observed": 1, "accepted": false})
    );
    assert_eq!(api.status_writes(), [patch]);
    let stored = api.get("ward.dev/v1", "Policy", None, "x").expect("stored");
    assert_eq!(stored["metadata"]["resourceVersion"], "2");
    assert_eq!(
        request(
            &api,
            "PATCH",
            "/apis/ward.dev/v1/policies/y/status",
            Some(&json!({}))
        )
        .code,
        404
    );

    let requests = api.requests();
    assert_eq!(requests[0], "GET /api/v1/pods");
    assert_eq!(
        requests[4],
        "POST /apis/events.k8s.io/v1/namespaces/a/events"
    );
}
