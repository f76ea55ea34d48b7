//! statehouse's gRPC API, `statehouse.v1`, and the conversion between JSON values and
//! `google.protobuf.Value`.
//!
//! Both the server's `grpc/` layer and the client use this crate; nothing else in the server
//! sees protobuf types.

pub mod value;

/// Generated messages and services of `statehouse.v1`.
pub mod v1 {
    tonic::include_proto!("statehouse.v1");
}

/// The encoded `FileDescriptorSet` of every statehouse proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/statehouse_descriptor.bin"));
