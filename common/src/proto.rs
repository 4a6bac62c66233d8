//! The generated gRPC code for `proto/cairn/v1/*.proto` (package `cairn.v1`).
//! Only this module, [`crate::model`] and the gRPC handlers see these types.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("cairn.v1");
