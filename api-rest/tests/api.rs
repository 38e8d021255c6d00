//! The resources API against the real Postgres: every endpoint, every error status, and what
//! each request left in `resources` and `outbox_events`.

use std::time::Duration;

use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use test_support::service::Service;
use test_support::{Source, TestDb};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_api-rest");

struct Api {
    db: TestDb,
    service: Service,
    http: Client,
}

impl Api {
    async fn start() -> Api {
        Api::start_with(&[]).await
    }

    async fn start_with(extra: &[(&'static str, &str)]) -> Api {
        let db = TestDb::create(Source::Rest).await;
        let mut env = vec![
            ("DATABASE_URL", db.owner_dsn()),
            ("DB_POOL_SIZE", "4".to_string()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let mut service = Service::spawn(BIN, &env);
        service
            .wait_for("/ready", 200, Duration::from_secs(30))
            .await;
        Api {
            db,
            service,
            http: test_support::api_client(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.service.base())
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.request(method, self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, headers, value)
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.request(method, self.url(path)).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        (
            status,
            headers,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn create(&self, body: Value) -> Value {
        let (status, _, v) = self
            .send(Method::POST, "/api/v1/resources", Some(body), &[])
            .await;
        assert_eq!(status, 201, "{v}");
        v
    }

    /// (resources rows, outbox rows)
    async fn counts(&self) -> (i64, i64) {
        (
            self.db.count("resources").await,
            self.db.count("outbox_events").await,
        )
    }

    /// The outbox events of one resource, oldest first: (event_type, aggregate_id, payload, traceparent).
    async fn events(&self, id: &str) -> Vec<(String, String, Value, Option<String>)> {
        let c = self.db.owner().await;
        c.query(
            "SELECT event_type, aggregate_id, payload, traceparent FROM outbox_events WHERE aggregate_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
    }

    async fn stop(self) {
        drop(self.service);
        self.db.cleanup().await;
    }
}

fn assert_problem(
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &Value,
    want: u16,
) {
    assert_eq!(status.as_u16(), want, "{body}");
    assert_eq!(
        headers["content-type"], "application/problem+json",
        "{body}"
    );
    assert_eq!(body["status"], want, "{body}");
    assert!(
        body["type"]
            .as_str()
            .unwrap()
            .starts_with("https://kafkify.dev/problems/"),
        "{body}"
    );
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
}

#[tokio::test]
async fn create_get_replace_delete_each_publish_one_event() {
    let api = Api::start().await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, headers, created) = api
        .send(
            Method::POST,
            "/api/v1/resources",
            Some(
                json!({"name": "alpha", "description": "first", "attributes": {"colour": "blue"}}),
            ),
            &[("traceparent", tp)],
        )
        .await;
    assert_eq!(status, 201);
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(headers["location"], format!("/api/v1/resources/{id}"));
    assert_eq!(headers["etag"], "\"1\"");
    assert_eq!(
        (created["name"].as_str(), created["version"].as_i64()),
        (Some("alpha"), Some(1))
    );

    let events = api.events(&id).await;
    assert_eq!(events.len(), 1);
    let (event_type, key, payload, traceparent) = &events[0];
    assert_eq!(
        (event_type.as_str(), key.as_str()),
        ("resource.created", id.as_str())
    );
    test_support::assert_child_traceparent(traceparent.as_deref(), tp);
    let event: schemas::ResourceCreated = serde_json::from_value(payload.clone()).unwrap();
    assert_eq!(event.resource_id.to_string(), id);
    assert_eq!((event.name.as_str(), event.version), ("alpha", 1));
    assert_eq!(event.attributes["colour"], "blue");
    // The payload fits the topic's schema exactly as the relay will encode it.
    assert!(schemas::schema("resource.created").is_ok());

    let (status, headers, got) = api
        .send(Method::GET, &format!("/api/v1/resources/{id}"), None, &[])
        .await;
    assert_eq!(status, 200);
    assert_eq!(headers["etag"], "\"1\"");
    assert_eq!(got, created);

    // Conditional replace: the wrong version changes nothing.
    let path = format!("/api/v1/resources/{id}");
    let (s, h, b) = api
        .send(
            Method::PUT,
            &path,
            Some(json!({"name": "beta"})),
            &[("if-match", "\"7\"")],
        )
        .await;
    assert_problem(s, &h, &b, 412);
    assert_eq!(api.events(&id).await.len(), 1);
    let (s, h, b) = api
        .send(
            Method::PUT,
            &path,
            Some(json!({"name": "beta"})),
            &[("if-match", "W/\"1\"")],
        )
        .await;
    assert_problem(s, &h, &b, 412);
    let (s, h, updated) = api
        .send(
            Method::PUT,
            &path,
            Some(json!({"name": "beta"})),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(s, 200, "{updated}");
    assert_eq!(h["etag"], "\"2\"");
    assert_eq!(
        (
            updated["name"].as_str(),
            updated["description"].as_str(),
            updated["version"].as_i64()
        ),
        (Some("beta"), Some(""), Some(2))
    );
    let events = api.events(&id).await;
    assert_eq!(events.len(), 2);
    let event: schemas::ResourceUpdated = serde_json::from_value(events[1].2.clone()).unwrap();
    assert_eq!((event.name.as_str(), event.version), ("beta", 2));
    // No traceparent sent: the request started a trace of its own, and the event carries it.
    let own = events[1].3.as_deref().expect("the request's own trace");
    assert!(own.starts_with("00-") && own.len() == 55, "{own}");
    assert_ne!(&own[3..35], &events[0].3.as_deref().unwrap()[3..35]);

    // Unconditional replace is allowed.
    let (s, _, b) = api
        .send(Method::PUT, &path, Some(json!({"name": "gamma"})), &[])
        .await;
    assert_eq!((s.as_u16(), b["version"].as_i64()), (200, Some(3)));

    // Conditional delete.
    let (s, h, b) = api
        .send(Method::DELETE, &path, None, &[("if-match", "\"2\"")])
        .await;
    assert_problem(s, &h, &b, 412);
    let (s, _, _) = api
        .send(Method::DELETE, &path, None, &[("if-match", "\"3\"")])
        .await;
    assert_eq!(s, 204);
    let events = api.events(&id).await;
    assert_eq!(
        events.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        [
            "resource.created",
            "resource.updated",
            "resource.updated",
            "resource.deleted"
        ]
    );
    let event: schemas::ResourceDeleted = serde_json::from_value(events[3].2.clone()).unwrap();
    assert_eq!(event.version, 3);

    for method in [Method::GET, Method::DELETE] {
        let (s, h, b) = api.send(method, &path, None, &[]).await;
        assert_problem(s, &h, &b, 404);
    }
    let (s, h, b) = api
        .send(Method::PUT, &path, Some(json!({"name": "x"})), &[])
        .await;
    assert_problem(s, &h, &b, 404);
    let (s, h, b) = api
        .send(Method::GET, "/api/v1/resources/not-a-uuid", None, &[])
        .await;
    assert_problem(s, &h, &b, 404);
    assert_eq!(api.counts().await, (0, 4));
    api.stop().await;
}

#[tokio::test]
async fn bad_requests_get_the_right_status_and_change_nothing() {
    let api = Api::start_with(&[("MAX_BODY_BYTES", "1024")]).await;
    let path = "/api/v1/resources";

    let (s, h, b) = api
        .raw(
            Method::POST,
            path,
            Some("application/json"),
            b"{\"name\": ".to_vec(),
        )
        .await;
    assert_problem(s, &h, &b, 400);
    let (s, h, b) = api
        .raw(
            Method::POST,
            path,
            Some("application/json"),
            b"{\"name\": \"\xff\xfe\"}".to_vec(),
        )
        .await;
    assert_problem(s, &h, &b, 400);
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let (s, h, b) = api
        .raw(
            Method::POST,
            path,
            Some("application/json"),
            deep.into_bytes(),
        )
        .await;
    assert_problem(s, &h, &b, 413);
    let deep = format!("{{\"name\": {}1{}}}", "[".repeat(300), "]".repeat(300));
    let (s, h, b) = api
        .raw(
            Method::POST,
            path,
            Some("application/json"),
            deep.into_bytes(),
        )
        .await;
    assert!(s == 400 || s == 422, "{s} {b}");
    assert_problem(s, &h, &b, s.as_u16());
    let (s, h, b) = api
        .raw(
            Method::POST,
            path,
            Some("text/plain"),
            b"{\"name\":\"a\"}".to_vec(),
        )
        .await;
    assert_problem(s, &h, &b, 415);
    let (s, h, b) = api
        .raw(Method::POST, path, None, b"{\"name\":\"a\"}".to_vec())
        .await;
    assert_problem(s, &h, &b, 415);
    let big = json!({"name": "a", "description": "x".repeat(2000)}).to_string();
    let (s, h, b) = api
        .raw(
            Method::POST,
            path,
            Some("application/json"),
            big.into_bytes(),
        )
        .await;
    assert_problem(s, &h, &b, 413);

    for (body, field) in [
        (json!({}), "name"),
        (json!({"name": ""}), "name"),
        (json!({"name": "x".repeat(201)}), "name"),
        (json!({"name": 5}), "name"),
        (json!({"name": "a\u{0}b"}), "name"),
        (json!({"name": "a", "colour": "red"}), "colour"),
        (
            json!({"name": "a", "attributes": {"n": 1e308}}),
            "attributes.n",
        ),
        (json!({"name": "a", "attributes": ["x"]}), "attributes"),
        (json!([1, 2]), "body"),
    ] {
        let (s, h, b) = api.send(Method::POST, path, Some(body.clone()), &[]).await;
        assert_problem(s, &h, &b, 422);
        assert_eq!(b["errors"][0]["field"], field, "{body} → {b}");
    }
    let (s, h, b) = api
        .send(
            Method::POST,
            path,
            Some(json!({"name": "a"})),
            &[("idempotency-key", "has space")],
        )
        .await;
    assert_problem(s, &h, &b, 400);
    let (s, h, b) = api
        .send(Method::PATCH, path, Some(json!({"name": "a"})), &[])
        .await;
    assert_problem(s, &h, &b, 405);
    assert_eq!(
        h["allow"], "GET, HEAD, POST",
        "RFC 9110: a 405 lists the allowed methods"
    );
    let (s, h, b) = api.send(Method::GET, "/api/v2/nothing", None, &[]).await;
    assert_problem(s, &h, &b, 404);

    // A failed replace leaves the resource and the outbox as they were.
    let created = api.create(json!({"name": "keep"})).await;
    let one = format!("{path}/{}", created["id"].as_str().unwrap());
    let (s, h, b) = api
        .send(Method::PUT, &one, Some(json!({"name": ""})), &[])
        .await;
    assert_problem(s, &h, &b, 422);
    let (s, h, b) = api
        .send(
            Method::PUT,
            &one,
            Some(json!({"name": "ok"})),
            &[("if-match", "3")],
        )
        .await;
    assert_problem(s, &h, &b, 400);
    let (_, _, after) = api.send(Method::GET, &one, None, &[]).await;
    assert_eq!(after, created);
    assert_eq!(
        api.counts().await,
        (1, 1),
        "only the one good create wrote anything"
    );
    api.stop().await;
}

#[tokio::test]
async fn idempotency_key_creates_once() {
    let api = Api::start().await;
    let body = json!({"name": "once", "attributes": {"a": "1", "b": "2"}});
    let key = [("idempotency-key", "order-42")];
    let (s1, h1, first) = api
        .send(Method::POST, "/api/v1/resources", Some(body.clone()), &key)
        .await;
    assert_eq!(s1, 201);
    assert!(!h1.contains_key("idempotency-replayed"));
    // Same request, keys in another order: a replay.
    let reordered = json!({"attributes": {"b": "2", "a": "1"}, "name": "once"});
    let (s2, h2, second) = api
        .send(Method::POST, "/api/v1/resources", Some(reordered), &key)
        .await;
    assert_eq!(s2, 201);
    assert_eq!(h2["idempotency-replayed"], "true");
    assert_eq!(second, first);
    // Concurrent retries: still one.
    let mut handles = Vec::new();
    for _ in 0..8 {
        let http = api.http.clone();
        let url = api.url("/api/v1/resources");
        let body = body.clone();
        handles.push(tokio::spawn(async move {
            http.post(url)
                .header("idempotency-key", "order-43")
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for h in handles {
        assert_eq!(h.await.unwrap(), 201);
    }
    let (s, h, b) = api
        .send(
            Method::POST,
            "/api/v1/resources",
            Some(json!({"name": "other"})),
            &key,
        )
        .await;
    assert_problem(s, &h, &b, 409);
    assert_eq!(
        api.counts().await,
        (2, 2),
        "one resource and one event per key"
    );
    api.stop().await;
}

#[tokio::test]
async fn listing_pages_through_everything_once_in_stable_order() {
    let api = Api::start().await;
    let mut names = Vec::new();
    for i in 0..23 {
        // Dots, &, % and non-ASCII: the cursor carries the last name, in any query string.
        let name = format!(
            "{}-{i:02} a.b&c %20 ü",
            if i % 2 == 0 { "even" } else { "odd" }
        );
        api.create(json!({ "name": name })).await;
        names.push(name);
    }
    for sort in ["updated_at", "name"] {
        let mut seen: Vec<Value> = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut q = format!("/api/v1/resources?limit=5&sort={sort}");
            if let Some(c) = &cursor {
                q.push_str(&format!("&cursor={}", percent_encode(c)));
            }
            let (s, _, page) = api.send(Method::GET, &q, None, &[]).await;
            assert_eq!(s, 200, "{page}");
            pages += 1;
            seen.extend(page["items"].as_array().unwrap().iter().cloned());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        assert_eq!(pages, 5);
        let ids: std::collections::HashSet<&str> =
            seen.iter().map(|r| r["id"].as_str().unwrap()).collect();
        assert_eq!((seen.len(), ids.len()), (23, 23), "every resource once");
        if sort == "name" {
            let got: Vec<&str> = seen.iter().map(|r| r["name"].as_str().unwrap()).collect();
            let mut want: Vec<&str> = names.iter().map(String::as_str).collect();
            want.sort();
            assert_eq!(got, want);
        } else {
            let times: Vec<&str> = seen
                .iter()
                .map(|r| r["updated_at"].as_str().unwrap())
                .collect();
            let parsed: Vec<chrono::DateTime<chrono::Utc>> =
                times.iter().map(|t| t.parse().unwrap()).collect();
            assert!(parsed.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
        }
    }
    let (_, _, page) = api
        .send(
            Method::GET,
            "/api/v1/resources?name_prefix=odd&limit=200",
            None,
            &[],
        )
        .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 11);
    assert!(page.get("next_cursor").is_none());
    let middle = {
        let (_, _, all) = api
            .send(Method::GET, "/api/v1/resources?limit=200", None, &[])
            .await;
        all["items"][9]["updated_at"].as_str().unwrap().to_string()
    };
    let (_, _, page) = api
        .send(
            Method::GET,
            &format!(
                "/api/v1/resources?limit=200&updated_after={}",
                middle.replace('+', "%2B")
            ),
            None,
            &[],
        )
        .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 13);

    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=ten", "limit"),
        ("sort=size", "sort"),
        ("cursor=bogus", "cursor"),
        ("updated_after=yesterday", "updated_after"),
        ("colour=red", "colour"),
    ] {
        let (s, h, b) = api
            .send(Method::GET, &format!("/api/v1/resources?{q}"), None, &[])
            .await;
        assert_problem(s, &h, &b, 422);
        assert_eq!(b["errors"][0]["field"], field, "{q}: {b}");
    }
    api.stop().await;
}

#[tokio::test]
async fn head_and_conditional_get_follow_rfc_9110() {
    let api = Api::start().await;
    let created = api.create(json!({"name": "cached"})).await;
    let path = format!("/api/v1/resources/{}", created["id"].as_str().unwrap());

    let (s, h, body) = api.send(Method::GET, &path, None, &[]).await;
    assert_eq!(s, 200);
    let etag = h["etag"].to_str().unwrap().to_string();
    let length = h["content-length"].to_str().unwrap().to_string();
    assert_ne!(body, Value::Null);

    // HEAD: GET's status and headers, no body.
    let (s, h, body) = api.send(Method::HEAD, &path, None, &[]).await;
    assert_eq!(s, 200);
    assert_eq!(h["etag"], etag.as_str());
    assert_eq!(
        h["content-length"],
        length.as_str(),
        "HEAD announces GET's length"
    );
    assert_eq!(body, Value::Null, "HEAD has no body");
    let (s, _, body) = api
        .send(Method::HEAD, "/api/v1/resources?limit=1", None, &[])
        .await;
    assert_eq!(s, 200);
    assert_eq!(body, Value::Null);
    let missing = format!("/api/v1/resources/{}", Uuid::now_v7());
    let (s, _, body) = api.send(Method::HEAD, &missing, None, &[]).await;
    assert_eq!(s, 404);
    assert_eq!(body, Value::Null);

    // If-None-Match: 304 with the ETag and no body while it is current, weak or strong, or *.
    for tag in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"999\", {etag}"),
        "*".to_string(),
    ] {
        let tag = tag.as_str();
        for method in [Method::GET, Method::HEAD] {
            let (s, h, body) = api
                .send(method.clone(), &path, None, &[("if-none-match", tag)])
                .await;
            assert_eq!(s, 304, "{method} If-None-Match: {tag}");
            assert_eq!(h["etag"], etag.as_str());
            assert_eq!(body, Value::Null);
        }
    }
    // Another version, or a header that is no ETag list (`*` only stands alone), gets the
    // full answer.
    for tag in ["\"999\"", "null", "", "\"999\", *"] {
        let (s, _, body) = api
            .send(Method::GET, &path, None, &[("if-none-match", tag)])
            .await;
        assert_eq!(s, 200, "If-None-Match: {tag:?}");
        assert_eq!(body["name"], "cached");
    }
    // After a replace the old ETag is stale.
    let (s, _, _) = api
        .send(Method::PUT, &path, Some(json!({"name": "changed"})), &[])
        .await;
    assert_eq!(s, 200);
    let (s, h, body) = api
        .send(Method::GET, &path, None, &[("if-none-match", &etag)])
        .await;
    assert_eq!(s, 200);
    assert_ne!(h["etag"], etag.as_str());
    assert_eq!(body["name"], "changed");
    api.stop().await;
}

#[tokio::test]
async fn openapi_document_describes_the_routes() {
    let api = Api::start().await;
    let (s, _, doc) = api.send(Method::GET, "/openapi.json", None, &[]).await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(
        paths.keys().collect::<Vec<_>>(),
        ["/api/v1/resources", "/api/v1/resources/{id}"]
    );
    for (path, methods) in [
        ("/api/v1/resources", vec!["get", "head", "post"]),
        (
            "/api/v1/resources/{id}",
            vec!["delete", "get", "head", "put"],
        ),
    ] {
        let mut got: Vec<&String> = paths[path]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "parameters")
            .collect();
        got.sort();
        assert_eq!(got, methods, "{path}");
    }
    for status in ["201", "400", "409", "413", "415", "422"] {
        assert!(
            paths["/api/v1/resources"]["post"]["responses"]
                .get(status)
                .is_some(),
            "POST documents {status}"
        );
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in ["Resource", "ResourceInput", "ResourcePage", "Problem"] {
        assert!(schemas.contains_key(name), "{name}");
    }
    api.stop().await;
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let api = Api::start().await;
    api.create(json!({"name": "m"})).await;
    api.send(
        Method::GET,
        &format!("/api/v1/resources/{}", Uuid::new_v4()),
        None,
        &[],
    )
    .await;
    let (_, metrics) = api.service.get("/metrics").await;
    assert!(metrics.contains(r#"kafkify_api_rest_http_request_duration_seconds_count{method="POST",route="/api/v1/resources",status="201"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"kafkify_api_rest_http_request_duration_seconds_count{method="GET",route="/api/v1/resources/{id}",status="404"} 1"#), "{metrics}");
    assert!(
        metrics.contains(r#"kafkify_api_rest_db_pool_connections{state="max"} 4"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("kafkify_api_rest_http_requests_in_flight 1"),
        "the scrape itself is in flight: {metrics}"
    );
    assert!(
        metrics.contains(
            r#"kafkify_api_rest_db_transaction_duration_seconds_count{operation="create"} 1"#
        ),
        "{metrics}"
    );
    api.stop().await;
}

#[tokio::test]
async fn the_api_needs_a_key_and_the_ops_paths_do_not() {
    let api = Api::start().await;
    let bare = Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = api.url("/api/v1/resources");
    for auth in [
        None,
        Some("Bearer not-the-key-0123456789"),
        Some("Basic a2V5OmtleQ=="),
        Some("Bearer"),
    ] {
        let mut req = bare.post(&url).json(&json!({"name": "nope"}));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        assert_eq!(
            resp.headers()["www-authenticate"],
            r#"Bearer realm="kafkify""#
        );
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["status"], 401, "{body}");
        let resp = bare.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 401);
    }
    assert_eq!(api.db.count("resources").await, 0, "nothing was written");
    assert_eq!(api.db.count("outbox_events").await, 0);
    for open in ["/health", "/ready", "/metrics", "/openapi.json"] {
        let resp = bare.get(api.url(open)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{open} stays open");
    }
    // With the key, the same request goes through.
    let (s, _, _) = api
        .send(
            Method::POST,
            "/api/v1/resources",
            Some(json!({"name": "yes"})),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (_, metrics) = api.service.get("/metrics").await;
    assert!(
        metrics.contains(r#"status="401""#),
        "refusals are counted: {metrics}"
    );
}

/// A query parameter value, percent-encoded (a cursor carries a name, which may hold anything).
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
