//! cdc-relay as a library: the pure decoding and encoding steps, and the relay loop that wires
//! them to Postgres, the schema registry and Kafka. The binary in `main.rs` is configuration
//! and start-up only.

pub mod checkpoint;
pub mod config;
pub mod encode;
pub mod error;
pub mod health;
pub mod machine;
pub mod metrics;
pub mod operator;
pub mod producer;
pub mod record;
pub mod registry;
pub mod relay;
pub mod topics;

// The decoder is its own crate (the fuzz targets build it alone); the relay's modules name it
// as before.
pub use ::pgoutput;
pub use ::pgoutput::outbox;
