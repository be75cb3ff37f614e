//! Whether the gateway is healthy, asked the way the OpenShell CLI asks it: the gateway's gRPC
//! `openshell.v1.OpenShell/Health` method over mutual TLS at the forwarded port, with the
//! client bundle the guest sent. The host polls it until the gateway answers HEALTHY or the
//! deadline passes; the last failure is the reason given. The TCP probe (`readiness`) stays as
//! the explicit fallback, `--ready-probe tcp`.
//!
//! The messages are `health_proto`'s, written by hand from the OpenShell proto.

use std::error::Error as _;
use std::time::{Duration, Instant};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::health_proto::{HealthRequest, HealthResponse, ServiceStatus, HEALTH_PATH};

/// How `up` decides that the gateway is ready once the guest reported `gateway-ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadyProbe {
    /// The gateway's gRPC health method over mutual TLS answers HEALTHY.
    Grpc,
    /// The forwarded port accepts and waits, as a TLS server does (no TLS, no gRPC).
    Tcp,
}

/// The guest's client bundle, PEM: its CA, the client certificate and the client key.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientBundle {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for ClientBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientBundle { .. }")
    }
}

/// The timing of the polling: the CLI's old probe waited 5 s to connect and 5 s for an answer,
/// and asked again every second.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connect: Duration,
    pub attempt: Duration,
    pub interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            attempt: Duration::from_secs(5),
            interval: Duration::from_secs(1),
        }
    }
}

/// Why one attempt did not find the gateway healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// No TCP, TLS or HTTP/2 connection (the chain of causes: a refused connection, a
    /// certificate not from the guest's CA, the gateway refusing ours).
    Connect(String),
    /// The call was made and failed with this gRPC status.
    Call { code: tonic::Code, message: String },
    /// Connected, asked, no answer in time.
    NoAnswer(Duration),
    /// The gateway answered, but not HEALTHY.
    Answered { status: String, version: String },
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::Connect(why) => write!(f, "cannot connect: {why}"),
            Attempt::Call { code, message } => {
                write!(f, "the health call failed: {code:?}: {message}")
            }
            Attempt::NoAnswer(t) => {
                write!(
                    f,
                    "the health call got no answer within {} ms",
                    t.as_millis()
                )
            }
            Attempt::Answered { status, version } => {
                write!(f, "the gateway answered {status} (version `{version}`)")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("{endpoint}: no client credentials from the guest to call its health method with")]
    NoCredentials { endpoint: String },
    #[error("{endpoint}: the guest's client bundle cannot be used: {reason}")]
    Bundle { endpoint: String, reason: String },
    #[error("{endpoint}: cannot run the gRPC client: {source}")]
    Runtime {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("{endpoint}: not healthy within {} s; last: {last}{}", within.as_secs_f32(),
            earlier.as_ref().map(|e| format!(" (before that: {e})")).unwrap_or_default())]
    NotHealthy {
        endpoint: String,
        within: Duration,
        last: Box<Attempt>,
        /// The latest attempt that failed otherwise, if any: a refusal followed by silence
        /// names both.
        earlier: Option<Box<Attempt>>,
    },
}

pub fn endpoint(port: u16) -> String {
    format!("https://127.0.0.1:{port}")
}

/// The gateway's text (its version, a status message) is not ours: at most this much of it is
/// kept (the terminal escaping is `progress`'s).
const MAX_GATEWAY_TEXT: usize = 200;

fn bounded(text: &str) -> String {
    match text.char_indices().nth(MAX_GATEWAY_TEXT) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// An error and its causes, one line: tonic's own text is only "transport error".
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = s.source();
    }
    parts.join(": ")
}

/// A status's text without tonic's wrapping, with its cause when there is one.
fn status_text(s: &tonic::Status) -> String {
    match s.source().map(chain) {
        Some(causes) if causes.starts_with(s.message()) => causes,
        Some(causes) => format!("{}: {causes}", s.message()),
        None => s.message().to_string(),
    }
}

/// The gateway's endpoint as the CLI reaches it: the server name is the address, which the
/// guest's server certificate carries as an IP name.
fn tls_endpoint(port: u16, bundle: &ClientBundle, limits: Limits) -> Result<Endpoint, String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&bundle.ca))
        .identity(Identity::from_pem(&bundle.cert, &bundle.key))
        .domain_name("127.0.0.1");
    Endpoint::from_shared(endpoint(port))
        .and_then(|e| e.tls_config(tls))
        .map(|e| e.connect_timeout(limits.connect).timeout(limits.attempt))
        .map_err(|e| chain(&e))
}

/// One connection and one call.
async fn attempt(ep: &Endpoint, limits: Limits) -> Result<String, Attempt> {
    let asked = async {
        let channel = ep
            .connect()
            .await
            .map_err(|e| Attempt::Connect(chain(&e)))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| Attempt::Connect(chain(&e)))?;
        let codec = tonic_prost::ProstCodec::<HealthRequest, HealthResponse>::default();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(HEALTH_PATH);
        let asked_at = Instant::now();
        grpc.unary(tonic::Request::new(HealthRequest {}), path, codec)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| match s.code() {
                // tonic ends a timed-out call as either; a connection cut early (a refused
                // client certificate) is also Cancelled, and is no timeout.
                tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
                    if asked_at.elapsed() >= limits.attempt =>
                {
                    Attempt::NoAnswer(limits.attempt)
                }
                code => Attempt::Call {
                    code,
                    message: bounded(&status_text(&s)),
                },
            })
    };
    let within = limits.connect + limits.attempt;
    let answer = tokio::time::timeout(within, asked)
        .await
        .map_err(|_| Attempt::NoAnswer(within))??;
    match ServiceStatus::try_from(answer.status) {
        Ok(ServiceStatus::Healthy) => Ok(bounded(&answer.version)),
        other => Err(Attempt::Answered {
            status: other.map_or_else(
                |_| format!("status {}", answer.status),
                |s| s.as_str_name().to_string(),
            ),
            version: bounded(&answer.version),
        }),
    }
}

/// Asks until the gateway at the forwarded `port` answers HEALTHY (its version is returned) or
/// `within` is spent; an attempt begun before the deadline is let finish (at most
/// `limits.connect + limits.attempt` more), so the reason given is a whole attempt's. Blocking:
/// runs a runtime of its own on the calling thread.
pub fn wait_healthy(
    port: u16,
    bundle: &ClientBundle,
    within: Duration,
    limits: Limits,
) -> Result<String, HealthError> {
    let endpoint = endpoint(port);
    let ep = tls_endpoint(port, bundle, limits).map_err(|reason| HealthError::Bundle {
        endpoint: endpoint.clone(),
        reason,
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| HealthError::Runtime {
            endpoint: endpoint.clone(),
            source,
        })?;
    let deadline = Instant::now() + within;
    rt.block_on(async {
        let mut earlier: Option<Attempt> = None;
        let mut previous: Option<Attempt> = None;
        loop {
            let last = match attempt(&ep, limits).await {
                Ok(version) => return Ok(version),
                Err(last) => last,
            };
            if let Some(p) = previous.take().filter(|p| p != &last) {
                earlier = Some(p);
            }
            if Instant::now() + limits.interval >= deadline {
                return Err(HealthError::NotHealthy {
                    endpoint,
                    within,
                    last: Box::new(last),
                    earlier: earlier.map(Box::new),
                });
            }
            previous = Some(last);
            tokio::time::sleep(limits.interval).await;
        }
    })
}

/// `up`'s one way to decide that the gateway behind the forwarded `port` is ready: `Ok` with
/// what was found, or the reason it is not (naming the endpoint).
pub fn probe(
    how: ReadyProbe,
    port: u16,
    bundle: Option<&ClientBundle>,
    within: Duration,
) -> Result<String, String> {
    match how {
        ReadyProbe::Tcp => {
            if crate::readiness::wait_for_gateway(port, within) {
                Ok(format!("127.0.0.1:{port} accepts (TCP probe)"))
            } else {
                Err(format!(
                    "127.0.0.1:{port} did not answer within {} s (TCP probe)",
                    within.as_secs()
                ))
            }
        }
        ReadyProbe::Grpc => {
            let bundle = bundle.ok_or_else(|| {
                HealthError::NoCredentials {
                    endpoint: endpoint(port),
                }
                .to_string()
            })?;
            wait_healthy(port, bundle, within, Limits::default())
                .map(|v| format!("{} is healthy (version `{v}`)", endpoint(port)))
                .map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health_server::{serve, Answer};
    use crate::test_pki::{self, GatewayPki};

    fn bundle(pki: &GatewayPki) -> ClientBundle {
        ClientBundle {
            ca: pki.ca.clone(),
            cert: pki.client.0.clone(),
            key: pki.client.1.clone(),
        }
    }

    /// Short enough for a test, long enough for a TLS handshake and a refusal on a machine
    /// busy with VM boots.
    const QUICK: Limits = Limits {
        connect: Duration::from_secs(5),
        attempt: Duration::from_secs(3),
        interval: Duration::from_millis(100),
    };

    fn not_healthy(port: u16, bundle: &ClientBundle, within: Duration) -> (Attempt, String) {
        match wait_healthy(port, bundle, within, QUICK) {
            Err(e @ HealthError::NotHealthy { .. }) => {
                let text = e.to_string();
                let HealthError::NotHealthy { last, .. } = e else {
                    unreachable!()
                };
                assert!(text.starts_with(&endpoint(port)), "{text}");
                (*last, text)
            }
            other => panic!("expected not healthy, got {other:?}"),
        }
    }

    #[test]
    fn a_healthy_gateway_with_the_guests_pki_is_ready() {
        let pki = GatewayPki::new();
        let port = serve(
            Answer::Status(ServiceStatus::Healthy),
            &pki.server,
            &pki.ca,
            0,
        );
        let version =
            wait_healthy(port, &bundle(&pki), Duration::from_secs(20), QUICK).expect("healthy");
        assert_eq!(version, crate::health_server::VERSION);
        let said = probe(
            ReadyProbe::Grpc,
            port,
            Some(&bundle(&pki)),
            Duration::from_secs(20),
        )
        .expect("ready");
        assert!(
            said.contains(&endpoint(port)) && said.contains("healthy"),
            "{said}"
        );
    }

    /// UNHEALTHY and DEGRADED are answers, not readiness: polled until the deadline, and the
    /// status is the reason given.
    #[test]
    fn an_unhealthy_or_degraded_gateway_is_not_ready() {
        let pki = GatewayPki::new();
        for (status, name) in [
            (ServiceStatus::Unhealthy, "SERVICE_STATUS_UNHEALTHY"),
            (ServiceStatus::Degraded, "SERVICE_STATUS_DEGRADED"),
        ] {
            let port = serve(Answer::Status(status), &pki.server, &pki.ca, 0);
            let (last, text) = not_healthy(port, &bundle(&pki), Duration::from_secs(3));
            assert!(matches!(last, Attempt::Answered { .. }), "{text}");
            assert!(
                text.contains(name) && text.contains(crate::health_server::VERSION),
                "{text}"
            );
        }
    }

    /// A server whose certificate is not from the guest's CA is not the guest's gateway.
    #[test]
    fn a_server_certificate_from_another_ca_is_refused() {
        let pki = GatewayPki::new();
        let (_, _, other) = test_pki::ca("openshell-ca");
        let impostor = test_pki::server(&other);
        let port = serve(
            Answer::Status(ServiceStatus::Healthy),
            &impostor,
            &pki.ca,
            0,
        );
        let (last, text) = not_healthy(port, &bundle(&pki), Duration::from_secs(3));
        assert!(matches!(last, Attempt::Connect(_)), "{text}");
        // Same CA name as the guest's, another key: the signature gives it away.
        assert!(text.contains("invalid peer certificate"), "{text}");
    }

    /// The gateway demands a client certificate from its CA: one from another CA gets no
    /// answer, the same server answers a certificate from its CA, and no bundle at all means
    /// no call.
    #[test]
    fn without_an_accepted_client_certificate_there_is_no_answer() {
        let pki = GatewayPki::new();
        let (other_ca, _, other) = test_pki::ca("openshell-ca");
        let port = serve(
            Answer::Status(ServiceStatus::Healthy),
            &pki.server,
            &other_ca,
            0,
        );
        // TLS 1.3: the handshake ends on the client's side before the server has checked the
        // certificate, so the refusal reaches the client after it has begun writing: as the
        // server's alert, or, when the server's close overtakes the alert (the rule on a busy
        // machine), as a cut connection (a broken pipe, a reset, or a plain close, whichever
        // the client's write or read meets first). Every attempt must be one of these, never
        // an answer, and each has room for a loaded machine (no timeout counts as a refusal).
        let patient = Limits {
            connect: Duration::from_secs(30),
            attempt: Duration::from_secs(30),
            interval: Duration::ZERO,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let refused = tls_endpoint(port, &bundle(&pki), patient).expect("endpoint");
        for _ in 0..3 {
            let refusal = match rt.block_on(attempt(&refused, patient)) {
                Ok(version) => panic!("answered without an accepted certificate: {version}"),
                Err(e @ (Attempt::Connect(_) | Attempt::Call { .. })) => e.to_string(),
                Err(other) => panic!("not a refusal: {other}"),
            };
            assert!(
                [
                    "received fatal alert",
                    "broken pipe",
                    "connection reset",
                    "connection closed"
                ]
                .iter()
                .any(|c| refusal.to_lowercase().contains(c)),
                "{refusal}"
            );
        }
        // The same server, the same CA for the server's side, a client certificate from the
        // CA it trusts: answered, so the refusals were the certificate's.
        let mut accepted = bundle(&pki);
        (accepted.cert, accepted.key) = test_pki::client(&other);
        let ep = tls_endpoint(port, &accepted, patient).expect("endpoint");
        let version = rt.block_on(attempt(&ep, patient)).expect("accepted");
        assert_eq!(version, crate::health_server::VERSION);
        let err =
            probe(ReadyProbe::Grpc, port, None, Duration::from_secs(1)).expect_err("no bundle");
        assert!(
            err.contains(&endpoint(port)) && err.contains("no client credentials"),
            "{err}"
        );
    }

    /// A gateway that takes the call and never answers: each attempt is cut off, and the
    /// whole wait ends at its deadline.
    #[test]
    fn a_gateway_that_never_answers_times_out_at_the_deadline() {
        let pki = GatewayPki::new();
        let port = serve(Answer::Hang, &pki.server, &pki.ca, 0);
        let started = Instant::now();
        let (last, text) = not_healthy(port, &bundle(&pki), Duration::from_secs(2));
        assert!(matches!(last, Attempt::NoAnswer(_)), "{text}");
        assert!(text.contains("no answer within"), "{text}");
        // The deadline, plus at most the one attempt begun before it.
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2 + 8), "took {took:?}");
    }

    /// A bundle whose key is not its certificate's cannot even be set up: named as the bundle's
    /// fault, before any connection.
    #[test]
    fn a_key_that_is_not_the_certificates_is_the_bundles_fault() {
        let pki = GatewayPki::new();
        let torn = ClientBundle {
            key: GatewayPki::new().client.1,
            ..bundle(&pki)
        };
        let err = wait_healthy(1, &torn, Duration::from_secs(1), QUICK).expect_err("torn");
        assert!(matches!(err, HealthError::Bundle { .. }), "{err}");
        assert!(err.to_string().contains("client bundle"), "{err}");
    }

    /// Nothing listening: the connection's refusal is the reason.
    #[test]
    fn nothing_listening_is_named() {
        let pki = GatewayPki::new();
        let gone = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = gone.local_addr().expect("addr").port();
        drop(gone);
        let (last, text) = not_healthy(port, &bundle(&pki), Duration::from_millis(500));
        assert!(matches!(last, Attempt::Connect(_)), "{text}");
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }

    #[test]
    fn the_gateways_text_is_bounded() {
        assert_eq!(bounded("0.3.1"), "0.3.1");
        let long = "é".repeat(MAX_GATEWAY_TEXT + 50);
        let cut = bounded(&long);
        assert_eq!(cut.chars().count(), MAX_GATEWAY_TEXT + 3);
        assert!(cut.ends_with("..."));
    }

    /// The wire format is the proto's: field 1 the status as a varint, field 2 the version.
    #[test]
    fn the_response_encodes_as_the_proto_says() {
        use prost::Message;
        let bytes = HealthResponse {
            status: ServiceStatus::Unhealthy as i32,
            version: "v".into(),
        }
        .encode_to_vec();
        assert_eq!(bytes, [0x08, 3, 0x12, 1, b'v']);
        assert!(HealthRequest {}.encode_to_vec().is_empty());
    }
}
