//! Drives the API with random and hostile requests (invalid UTF-8, huge and odd numbers, deep
//! JSON, wrong types, garbage headers, odd paths and methods) and checks that none gets a 5xx
//! and that the database holds exactly what the successful requests wrote.

use std::time::Duration;

use reqwest::Method;
use test_support::rng::Rng;
use test_support::service::Service;
use test_support::{Source, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_api-rest");
const CASES: usize = 1500;

fn text(rng: &mut Rng) -> String {
    let pieces = [
        "a",
        "é",
        "💥",
        "\u{0}",
        "\\",
        "\"",
        "'",
        "%",
        "_",
        "\u{202e}",
        " ",
        "\n",
        "\u{ffff}",
        "名前",
        "<script>",
        "'; DROP TABLE resources; --",
        "\u{1}",
    ];
    let n = rng.index(12);
    let mut s = String::new();
    for _ in 0..n {
        let piece: &&str = rng.pick(&pieces);
        s.push_str(piece);
    }
    if rng.index(20) == 0 {
        s.push_str(&"x".repeat(190 + rng.index(30)));
    }
    s
}

fn json_value(rng: &mut Rng, depth: usize) -> String {
    let numbers = [
        "0",
        "-0",
        "1e308",
        "1e400",
        "-1e400",
        "99999999999999999999999999",
        "3.14",
        "-9223372036854775809",
        "1E-400",
        "0.0000001",
    ];
    match rng.index(if depth > 3 { 4 } else { 7 }) {
        0 => rng.pick(&numbers).to_string(),
        1 => serde_json::to_string(&text(rng)).unwrap(),
        2 => rng.pick(&["true", "false", "null"]).to_string(),
        3 => format!(
            "{}1{}",
            "[".repeat(rng.index(300)),
            "]".repeat(rng.index(300))
        ),
        4 => {
            let items: Vec<String> = (0..rng.index(4))
                .map(|_| json_value(rng, depth + 1))
                .collect();
            format!("[{}]", items.join(","))
        }
        _ => {
            let keys = [
                "name",
                "description",
                "attributes",
                "id",
                "version",
                "x",
                "",
                "name",
            ];
            let fields: Vec<String> = (0..rng.index(5))
                .map(|_| {
                    format!(
                        "{}:{}",
                        serde_json::to_string(rng.pick(&keys)).unwrap(),
                        json_value(rng, depth + 1)
                    )
                })
                .collect();
            format!("{{{}}}", fields.join(","))
        }
    }
}

fn body(rng: &mut Rng) -> Vec<u8> {
    match rng.index(9) {
        // Near-valid: the right shape with hostile strings, so the write paths are reached too.
        6..=8 => {
            let attrs: serde_json::Map<String, serde_json::Value> = (0..rng.index(4))
                .map(|_| (text(rng), serde_json::Value::String(text(rng))))
                .collect();
            serde_json::json!({"name": text(rng), "description": text(rng), "attributes": attrs})
                .to_string()
                .into_bytes()
        }
        0 => (0..rng.index(200)).map(|_| rng.next_u64() as u8).collect(),
        1 => {
            let mut b = format!("{{\"name\":\"{}", text(rng)).into_bytes();
            b.extend_from_slice(&[0xff, 0xfe, 0xc3]);
            b.extend_from_slice(b"\"}");
            b
        }
        2 => {
            let attrs: Vec<String> = (0..rng.index(60))
                .map(|i| {
                    format!(
                        "\"k{i}{}\":{}",
                        text(rng).replace(['"', '\\'], ""),
                        json_value(rng, 2)
                    )
                })
                .collect();
            format!(
                "{{\"name\":{},\"attributes\":{{{}}}}}",
                serde_json::to_string(&text(rng)).unwrap(),
                attrs.join(",")
            )
            .into_bytes()
        }
        3 => format!("{{\"name\":{}}}", json_value(rng, 0)).into_bytes(),
        _ => json_value(rng, 0).into_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_requests_never_get_a_5xx_and_leave_consistent_data() {
    let db = TestDb::create(Source::Rest).await;
    let mut service = Service::spawn(
        BIN,
        &[
            ("DATABASE_URL", db.owner_dsn()),
            ("MAX_BODY_BYTES", "4096".into()),
        ],
    );
    service
        .wait_for("/ready", 200, Duration::from_secs(30))
        .await;
    let http = test_support::api_client();
    let mut rng = Rng::new(0x5eed_cafe_f00d_0001);
    let mut ids: Vec<String> = vec!["00000000-0000-0000-0000-000000000000".into()];
    let mut writes = 0i64;
    let mut statuses = std::collections::BTreeMap::new();

    for case in 0..CASES {
        let method = rng
            .pick(&[
                Method::POST,
                Method::POST,
                Method::POST,
                Method::PUT,
                Method::PUT,
                Method::GET,
                Method::DELETE,
                Method::PATCH,
                Method::HEAD,
            ])
            .clone();
        let id = rng.pick(&ids).clone();
        let path = match if method == Method::POST && rng.index(4) != 0 {
            0
        } else {
            rng.index(8)
        } {
            0 => "/api/v1/resources".to_string(),
            1 => format!(
                "/api/v1/resources?limit={}&cursor={}&sort={}&name_prefix={}",
                rng.pick(&["0", "5", "-1", "1e3", "200", "x"]),
                rng.pick(&["", "e30", "%FF", "!!"]),
                rng.pick(&["name", "updated_at", "?"]),
                rng.pick(&["a", "%00", "%E2%80%AE", ""])
            ),
            2 => format!(
                "/api/v1/resources/{}",
                rng.pick(&[
                    "%00",
                    "..%2F..",
                    "not-a-uuid",
                    "%F0%9F%92%A5",
                    &"9".repeat(500)
                ])
            ),
            3 => "/api/v1/resources/".to_string(),
            _ => format!("/api/v1/resources/{id}"),
        };
        let mut req = http.request(method.clone(), format!("{}{path}", service.base()));
        let content_type = rng.pick(&[
            "application/json",
            "application/json",
            "application/json; charset=utf-8",
            "application/json; charset=latin1",
            "text/plain",
            "",
            "application/vnd.api+json",
        ]);
        if !content_type.is_empty() {
            req = req.header("content-type", *content_type);
        }
        if rng.index(4) == 0 {
            req = req.header(
                "if-match",
                *rng.pick(&[
                    "*",
                    "\"1\"",
                    "\"2\"",
                    "W/\"1\"",
                    "1",
                    "\"\"",
                    "\"99999999999999999999\"",
                    "garbage,\"1\"",
                ]),
            );
        }
        if rng.index(4) == 0 {
            req = req.header(
                "idempotency-key",
                *rng.pick(&["k1", "k2", "", "with space", "é"]),
            );
        }
        if rng.index(4) == 0 {
            req = req.header(
                "traceparent",
                *rng.pick(&[
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    "ff-0-0-0",
                    "00-xyz",
                ]),
            );
        }
        if matches!(method, Method::POST | Method::PUT | Method::PATCH) {
            req = req.body(body(&mut rng));
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("case {case}: {method} {path}: {e}"));
        let status = resp.status().as_u16();
        let replayed = resp.headers().contains_key("idempotency-replayed");
        let text = resp.text().await.unwrap_or_default();
        assert!(
            status < 500,
            "case {case}: {method} {path} → {status} {text}"
        );
        *statuses.entry(status).or_insert(0) += 1;
        match (method.as_str(), status) {
            ("POST", 201) if !replayed => {
                writes += 1;
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                ids.push(v["id"].as_str().unwrap().to_string());
            }
            ("PUT", 200) | ("DELETE", 204) => writes += 1,
            _ => {}
        }
    }
    eprintln!("{CASES} hostile requests, statuses {statuses:?}, {writes} writes");
    assert!(
        writes > 0 && statuses.len() > 5,
        "the generator must reach both good and bad paths"
    );

    let c = db.owner().await;
    let events: i64 = c
        .query_one("SELECT count(*) FROM outbox_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        events, writes,
        "one outbox event per successful write, none for failures"
    );
    let orphans: i64 = c
        .query_one(
            "SELECT count(*) FROM resources r WHERE NOT EXISTS (
               SELECT 1 FROM outbox_events o WHERE o.aggregate_id = r.id::text AND o.event_type = 'resource.created')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0, "every resource has its created event");
    drop(c);
    drop(service);
    db.cleanup().await;
}
