//! The HTTP/1.1 side: the accept loop on the stand-in's own runtime, and what each request gets.

use std::convert::Infallible;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use super::query::{self, Selectors};
use super::resources::{self, Target};
use super::watch::{self, Watch};
use super::{status, Shared};

type Body = BoxBody<Bytes, Infallible>;

/// Serves `listener` until `stop` fires; open connections end with the runtime.
pub(super) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    listener
        .set_nonblocking(true)
        .expect("a listening socket can be non-blocking");
    let listener =
        tokio::net::TcpListener::from_std(listener).expect("the runtime takes the listener");
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors and the like: the client sees a refused connection and retries.
                Err(_) => continue,
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request| respond(shared.clone(), request));
            // A client going away mid-stream is no failure of the stand-in.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = request.method().clone();
    let uri = request.uri().clone();
    let failure = {
        let mut state = shared.lock();
        state.requests.push(format!(
            "{method} {}",
            uri.path_and_query().map_or(uri.path(), |p| p.as_str())
        ));
        state.failures.take_one()
    };
    if let Some(code) = failure {
        return Ok(json_response(
            code,
            &status(code, "the stand-in was told to fail this request"),
        ));
    }
    let query = query::parse(uri.query().unwrap_or(""));
    let path = uri.path().to_owned();
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return Ok(bad_request(&format!("reading the request body: {e}"))),
    };
    if method == Method::POST && path == TOKEN_REVIEWS {
        return Ok(match parse_object(&body) {
            Ok(review) => review_token(&shared, review),
            Err(message) => bad_request(&message),
        });
    }
    let Some(target) = resources::parse(&path) else {
        return Ok(not_found(&path));
    };
    Ok(route(&shared, method, &target, &query, &body))
}

fn route(
    shared: &Arc<Shared>,
    method: Method,
    target: &Target,
    query: &std::collections::BTreeMap<String, String>,
    body: &[u8],
) -> Response<Body> {
    let resource = target.resource;
    let namespace = target.namespace.as_deref();
    match (
        &method,
        target.name.as_deref(),
        target.subresource.as_deref(),
    ) {
        (&Method::GET, None, None) if !resource.is_event() => {
            let selectors = match Selectors::from_query(query) {
                Ok(selectors) => selectors,
                Err(message) => return bad_request(&message),
            };
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                watch(shared, target, query, selectors)
            } else {
                list(shared, target, &selectors)
            }
        }
        (&Method::GET, Some(name), None) if !resource.is_event() => {
            match shared.lock().store.get(resource, namespace, name) {
                Some(object) => json_response(200, object),
                None => not_found(&format!("{} {name:?}", resource.kind)),
            }
        }
        (&Method::POST, None, None) if resource.is_event() => match parse_object(body) {
            Ok(event) => record_event(shared, event, 201),
            Err(message) => bad_request(&message),
        },
        (&Method::PATCH | &Method::PUT, Some(_), None) if resource.is_event() => {
            match parse_object(body) {
                Ok(event) => record_event(shared, event, 200),
                Err(message) => bad_request(&message),
            }
        }
        (&Method::PATCH | &Method::PUT, Some(name), Some("status")) => match parse_object(body) {
            Ok(write) => write_status(shared, target, name, method == Method::PUT, write),
            Err(message) => bad_request(&message),
        },
        _ => not_found(&format!("{method} of {} here", resource.kind)),
    }
}

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// A `TokenReview`'s answer: its spec with a status from the tokens the test issued.
fn review_token(shared: &Shared, mut review: Value) -> Response<Body> {
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let audiences: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let issued = shared.lock().tokens.get(token).cloned();
    review["status"] = match issued {
        Some(t) if audiences.is_empty() || audiences.contains(&t.audience) => json!({
            "authenticated": true,
            "audiences": [t.audience],
            "user": {
                "username": t.username,
                "extra": {"authentication.kubernetes.io/node-name": [t.node]},
            },
        }),
        _ => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    json_response(201, &review)
}

fn list(shared: &Shared, target: &Target, selectors: &Selectors) -> Response<Body> {
    let state = shared.lock();
    let items: Vec<Value> = state
        .store
        .list(target.resource, target.namespace.as_deref())
        .filter(|o| selectors.matches(o))
        .map(|o| {
            let mut item = o.clone();
            if let Some(fields) = item.as_object_mut() {
                fields.remove("kind");
                fields.remove("apiVersion");
            }
            item
        })
        .collect();
    json_response(
        200,
        &json!({
            "kind": format!("{}List", target.resource.kind),
            "apiVersion": target.resource.api_version,
            "metadata": {"resourceVersion": state.store.revision().to_string()},
            "items": items,
        }),
    )
}

fn watch(
    shared: &Arc<Shared>,
    target: &Target,
    query: &std::collections::BTreeMap<String, String>,
    selectors: Selectors,
) -> Response<Body> {
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(text) => match text.parse::<u64>() {
            Ok(revision) => Some(revision),
            Err(_) => return bad_request(&format!("invalid resourceVersion {text:?}")),
        },
    };
    let timeout = match query.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
        None => None,
        Some(Ok(seconds)) => Some(Duration::from_secs(seconds)),
        Some(Err(_)) => return bad_request("invalid timeoutSeconds"),
    };
    let params = watch::Params {
        from,
        bookmarks: query
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true"),
        initial_events_end: query.get("sendInitialEvents").is_some_and(|v| v == "true"),
        timeout,
    };
    let watch = Watch::open(
        shared.clone(),
        target.resource,
        target.namespace.clone(),
        selectors,
        params,
    );
    let stream = futures_util::stream::unfold(watch, |mut watch| async move {
        let chunk = watch.next().await?;
        Some((Ok(Frame::data(chunk)), watch))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("a valid response")
}

/// A write of the `status` subresource: PUT replaces the status with the body's, PATCH merges
/// the body's (RFC 7386; a strategic-merge or apply patch of a plain status merges the same).
fn write_status(
    shared: &Shared,
    target: &Target,
    name: &str,
    replace: bool,
    write: Value,
) -> Response<Body> {
    let mut state = shared.lock();
    let namespace = target.namespace.as_deref();
    let Some(mut object) = state.store.get(target.resource, namespace, name).cloned() else {
        return not_found(&format!("{} {name:?}", target.resource.kind));
    };
    state.status_writes.push(write.clone());
    if replace {
        object["status"] = write["status"].clone();
    } else {
        merge_patch(&mut object["status"], &write["status"]);
    }
    let stored = state.store.replace(target.resource, object);
    drop(state);
    shared.pulse.send_replace(());
    json_response(200, &stored)
}

fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in fields {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn parse_object(body: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(value) if value.is_object() => Ok(value),
        Ok(_) => Err("the body is not a JSON object".into()),
        Err(e) => Err(format!("the body is not JSON: {e}")),
    }
}

/// An Event written, kept for the test and answered with itself.
fn record_event(shared: &Shared, event: Value, code: u16) -> Response<Body> {
    shared.lock().events.push(event.clone());
    json_response(code, &event)
}

fn bad_request(message: &str) -> Response<Body> {
    json_response(400, &status(400, message))
}

fn not_found(what: &str) -> Response<Body> {
    json_response(
        404,
        &status(404, &format!("the stand-in API server has no {what}")),
    )
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(Full::new(Bytes::from(body.to_string()))))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patches_set_replace_and_remove() {
        let mut status = json!({"phase": "Pending", "conditions": [1], "keep": true});
        merge_patch(
            &mut status,
            &json!({"phase": "Refused", "conditions": [2], "keep": null, "new": {"a": 1}}),
        );
        assert_eq!(
            status,
            json!({"phase": "Refused", "conditions": [2], "new": {"a": 1}})
        );
        let mut absent = Value::Null;
        merge_patch(&mut absent, &json!({"phase": "Ready"}));
        assert_eq!(absent, json!({"phase": "Ready"}));
    }
}
