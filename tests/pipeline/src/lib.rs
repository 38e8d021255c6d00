//! No code: this crate holds the tests of the whole pipeline (`tests/`), every process real,
//! so that each service crate's own tests are about that crate. The services they start are
//! the workspace's binaries (`cargo test --workspace` builds them first).
