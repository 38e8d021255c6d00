//! api-grpc through a client in another language: Python grpcio with stubs generated from
//! `api-grpc/proto` at run time, and grpcio-reflection's v1alpha client
//! (`tests/grpc-python/client.py`), against the whole pipeline, so WatchTask follows a task
//! until the worker completed it. Covers ProcessTask, WatchTask, GetTaskStatus, ListTasks
//! paging, idempotency keys, health, reflection, and the error codes.
//!
//! Needs the Python environment of `tests/grpc-python/requirements.txt`: `./kafkify test`
//! installs it and sets `KAFKIFY_GRPC_PYTHON` to its interpreter.

mod pipeline;

use std::path::Path;

use pipeline::Pipeline;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_client_works_end_to_end() {
    let python = std::env::var("KAFKIFY_GRPC_PYTHON").expect(
        "KAFKIFY_GRPC_PYTHON names the Python of tests/grpc-python; ./kafkify test installs it and sets it",
    );
    let p = Pipeline::start().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut cmd = std::process::Command::new(python);
    cmd.arg(root.join("tests/grpc-python/client.py"))
        .args(["--target", &format!("127.0.0.1:{}", p.grpc_port)])
        .args(["--key", test_support::API_KEY])
        .arg("--proto")
        .arg(root.join("api-grpc/proto"));
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("python runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    assert!(out.status.success(), "the Python client failed:\n{text}");
    assert!(text.contains("all checks passed"), "{text}");
    p.stop().await;
}
