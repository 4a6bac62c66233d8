//! The coordinator's two gRPC services and what guards them: the Admin API
//! for operators (`admin`), the AgentGateway for agents (`gateway`), the
//! authentication of callers (`auth`), the limits on callers without a
//! certificate (`unauthenticated`), refusals counted instead of logged one
//! by one (`refusals`), and catalog records as the Admin API sends them
//! (`wire`).

pub mod admin;
pub mod auth;
pub mod gateway;
pub mod refusals;
pub mod retention;
pub mod unauthenticated;
pub mod wire;
