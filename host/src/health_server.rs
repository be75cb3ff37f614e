//! Tests only (the host's, and the VM tests, which compile this file too): a gateway serving
//! the OpenShell `Health` method with mutual TLS on tonic, as the real gateway does. Hand-written
//! like the client, from the messages in `health_proto`; it is the real protocol on a real
//! server, differing from the gateway only in having no other method and a fixed answer.

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::{NamedService, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::health_proto::{HealthRequest, HealthResponse, ServiceStatus, HEALTH_PATH};

/// The version the test gateway reports.
pub const VERSION: &str = "0.0.0-test";

/// What the test gateway answers to `Health`.
#[derive(Clone, Copy)]
pub enum Answer {
    Status(ServiceStatus),
    /// Takes the call and never answers.
    Hang,
}

/// The gateway's `OpenShell` service, its `Health` method only (anything else is
/// UNIMPLEMENTED, as a tonic server says for an unknown method), written by hand like the
/// client: a real tonic server speaking the real protocol, not a stand-in for the transport.
#[derive(Clone)]
struct Gateway(Answer);

impl NamedService for Gateway {
    const NAME: &'static str = "openshell.v1.OpenShell";
}

struct HealthMethod(Answer);

impl UnaryService<HealthRequest> for HealthMethod {
    type Response = HealthResponse;
    type Future = BoxFuture<tonic::Response<HealthResponse>, tonic::Status>;
    fn call(&mut self, _: tonic::Request<HealthRequest>) -> Self::Future {
        let answer = self.0;
        Box::pin(async move {
            match answer {
                Answer::Status(s) => Ok(tonic::Response::new(HealthResponse {
                    status: s as i32,
                    version: VERSION.into(),
                })),
                Answer::Hang => std::future::pending().await,
            }
        })
    }
}

impl Service<http::Request<tonic::body::Body>> for Gateway {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let answer = self.0;
        Box::pin(async move {
            if req.uri().path() != HEALTH_PATH {
                return Ok(tonic::Status::unimplemented("").into_http());
            }
            let codec = tonic_prost::ProstCodec::<HealthResponse, HealthRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            Ok(grpc.unary(HealthMethod(answer), req).await)
        })
    }
}

/// Serves `answer` with mutual TLS on 127.0.0.1:`port` (0: any free port), in a thread of its
/// own, as the gateway does: `server` is its certificate and key, `client_ca` the CA its clients'
/// certificates must come from. Returns the port.
pub fn serve(answer: Answer, server: &(String, String), client_ca: &str, port: u16) -> u16 {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&server.0, &server.1))
        .client_ca_root(Certificate::from_pem(client_ca));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .expect("bind");
            tx.send(listener.local_addr().expect("addr").port())
                .expect("port");
            Server::builder()
                .tls_config(tls)
                .expect("tls")
                .add_service(Gateway(answer))
                .serve_with_incoming(TcpIncoming::from(listener))
                .await
                .expect("serve");
        });
    });
    rx.recv().expect("port")
}
