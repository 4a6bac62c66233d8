//! The message limit for callers without a certificate. The AgentGateway
//! accepts chunk messages of up to 9 MiB from agents; a client that has not
//! authenticated (anyone who can reach the port) and every enrollment get
//! a small budget instead, applied to the request body before tonic decodes
//! a byte of it.

use cairn_common::proto::agent_gateway_server::AgentGatewayServer;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The most a request body without a client certificate, or an
/// enrollment, may hold: an enrollment (token and CSR) is under 4 KiB.
pub const UNAUTHENTICATED_BODY_MAX_BYTES: usize = 64 * 1024;

/// Whether the request came over a connection without a client certificate.
fn is_anonymous(request: &http::Request<Body>) -> bool {
    request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .is_none_or(|certificates| certificates.is_empty())
}

/// Whether the request is `AgentGateway/Enroll`.
fn is_enrollment(request: &http::Request<Body>) -> bool {
    request
        .uri()
        .path()
        .strip_prefix('/')
        .and_then(|path| path.split_once('/'))
        .is_some_and(|(service, method)| {
            service == <AgentGatewayServer<crate::api::gateway::Gateway> as NamedService>::NAME
                && method == "Enroll"
        })
}

/// For `tower::util::MapRequestLayer`: caps the body of unauthenticated
/// requests and of enrollments at [`UNAUTHENTICATED_BODY_MAX_BYTES`]; a
/// larger body fails the call before it is decoded.
pub fn limit_body(request: http::Request<Body>) -> http::Request<Body> {
    if is_anonymous(&request) || is_enrollment(&request) {
        request.map(|body| {
            Body::new(http_body_util::Limited::new(
                body,
                UNAUTHENTICATED_BODY_MAX_BYTES,
            ))
        })
    } else {
        request
    }
}
