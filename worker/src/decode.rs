//! From a Kafka record to a checked event (in `schemas::decode`, beside the schemas, so the
//! fuzz targets build it without the worker's Kafka and Postgres stack), and the task
//! computation. Pure: no I/O.

pub use schemas::decode::*;
use sha2::{Digest, Sha256};

/// The outcome of a task: `Ok(result JSON)` or `Err(why it failed)`.
///
/// `checksum`: SHA-256 of the input, re-hashed `iterations` times (the configurable cost load
/// tests dial); `echo`: the input itself. Any other type fails, which is an outcome, not poison.
pub fn run_task(task_type: &str, input: &str, iterations: u32) -> Result<String, String> {
    match task_type {
        "checksum" => {
            let mut digest = Sha256::digest(input.as_bytes());
            for _ in 1..iterations.max(1) {
                digest = Sha256::digest(digest);
            }
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            Ok(serde_json::json!({ "sha256": hex, "iterations": iterations.max(1) }).to_string())
        }
        "echo" => Ok(input.to_string()),
        other => Err(format!("unknown task type `{other}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_are_deterministic() {
        let a = run_task("checksum", "{\"n\":1}", 3).unwrap();
        assert_eq!(a, run_task("checksum", "{\"n\":1}", 3).unwrap());
        assert_ne!(a, run_task("checksum", "{\"n\":1}", 4).unwrap());
        // SHA-256 of "abc", once.
        assert!(run_task("checksum", "abc", 1)
            .unwrap()
            .contains("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
        assert_eq!(run_task("echo", "[1]", 1).unwrap(), "[1]");
        assert_eq!(
            run_task("teleport", "{}", 1).unwrap_err(),
            "unknown task type `teleport`"
        );
    }
}
