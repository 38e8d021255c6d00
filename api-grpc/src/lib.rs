//! api-grpc as a library: the generated protocol types (also used by tests and clients), the
//! task store, the service and the `task.completed` consumer. `main.rs` is start-up only.

pub mod pb {
    tonic::include_proto!("kafkify.task.v1");

    /// For server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("task_descriptor");
}

pub mod completions;
pub mod service;
pub mod store;
