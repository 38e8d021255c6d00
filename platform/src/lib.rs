//! What every Kafkify binary shares. Kept deliberately small: anything that only one service
//! needs lives in that service's crate.

pub mod auth;
pub mod config;
pub mod db;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod outbox;
#[cfg(feature = "registry")]
pub mod registry;
pub mod retry;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod trace;
