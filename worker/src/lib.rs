//! worker as a library: decoding and task logic (pure), the store, and the consumer.

pub mod consume;
pub mod decode;
pub mod flow;
pub mod store;
