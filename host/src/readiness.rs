//! When the VM counts as ready. The guest announces in `hello` the readiness stages it will
//! report; the host waits for the last of them, each within a deadline (a stage that does not come
//! is named), and when that last stage is the gateway's NodePort answering on the guest's node IP,
//! the host also probes the port it forwarded to it, since that is the path the user's tools take
//! (the forward reaches the guest's own address, never its loopback).

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use openshell_shared::protocol::stage;

/// What a reported stage leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// More stages to come.
    Waiting,
    /// The last stage: ready.
    Ready,
    /// The last stage is the gateway's: probe its forwarded port first.
    Probe,
    /// Not a stage to act on: unknown, not announced, reported before, or after the last one.
    /// A guest repeating stages must not make the host rewrite its state each time.
    Ignored,
}

/// The stages there are (`openshell_shared::protocol::stage`); a guest may announce no others.
const KNOWN: [&str; 5] = [
    stage::WORKLOAD_STARTED,
    stage::K3S_STARTED,
    stage::APISERVER_READY,
    stage::NODE_READY,
    stage::GATEWAY_READY,
];

#[derive(Debug)]
pub struct Readiness {
    expected: Vec<String>,
    reached: Vec<String>,
    timeout: Duration,
    deadline: Option<Instant>,
}

impl Readiness {
    pub fn new(timeout: Duration) -> Self {
        Self {
            expected: Vec::new(),
            reached: Vec::new(),
            timeout,
            deadline: None,
        }
    }

    /// The guest said which stages come: the first is now awaited. Only known stages count,
    /// each once, so what the host keeps per stage is bounded whatever the guest announces.
    pub fn hello(&mut self, stages: &[String], now: Instant) {
        self.expected.clear();
        for s in stages {
            if KNOWN.contains(&s.as_str()) && !self.expected.contains(s) {
                self.expected.push(s.clone());
            }
        }
        self.deadline = Some(now + self.timeout);
    }

    /// A stage arrived. A guest that announced nothing is ready at its first (known) stage.
    pub fn stage(&mut self, name: &str, now: Instant) -> Step {
        let announced = if self.expected.is_empty() {
            KNOWN.contains(&name) && self.reached.is_empty()
        } else {
            self.expected.iter().any(|s| s == name)
        };
        let finished = self
            .expected
            .last()
            .is_some_and(|l| self.reached.contains(l));
        if !announced || finished || self.reached.iter().any(|s| s == name) {
            return Step::Ignored;
        }
        self.reached.push(name.to_string());
        let last = match self.expected.last() {
            None => true,
            Some(l) => l == name,
        };
        if !last {
            self.deadline = Some(now + self.timeout);
            return Step::Waiting;
        }
        self.deadline = None;
        if name == stage::GATEWAY_READY {
            Step::Probe
        } else {
            Step::Ready
        }
    }

    /// The first announced stage not reached yet.
    pub fn awaited(&self) -> Option<&str> {
        self.expected
            .iter()
            .find(|s| !self.reached.contains(s))
            .map(String::as_str)
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Stops waiting (the workload ended, or the boot failed).
    pub fn stop(&mut self) {
        self.deadline = None;
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// One look at the forwarded gateway port (spec 2.6): it must accept, and then say nothing for a
/// moment, as a TLS server waiting for the client's hello does. End of stream, a reset or data
/// mean something else answered: passt and gvproxy accept and reset when nothing listens inside.
pub fn gateway_answers(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    if s.set_read_timeout(Some(Duration::from_millis(200)))
        .is_err()
    {
        return false;
    }
    let mut byte = [0u8; 1];
    match s.read(&mut byte) {
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        // End of stream (0) or data (1; more cannot fit): not a server waiting for its client.
        Ok(0 | 1) => false,
        Ok(_) => false,
    }
}

/// Probes until the gateway answers or `within` is spent.
pub fn wait_for_gateway(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if gateway_answers(port) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn stages(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_last_announced_stage_is_ready_and_each_has_a_deadline() {
        let t0 = Instant::now();
        let mut r = Readiness::new(Duration::from_secs(5));
        r.hello(
            &stages(&["workload-started", "k3s-started", "gateway-ready"]),
            t0,
        );
        assert_eq!(r.awaited(), Some("workload-started"));
        assert_eq!(r.deadline(), Some(t0 + Duration::from_secs(5)));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(r.stage("workload-started", t1), Step::Waiting);
        assert_eq!(
            r.deadline(),
            Some(t1 + Duration::from_secs(5)),
            "renewed per stage"
        );
        assert_eq!(r.awaited(), Some("k3s-started"));
        assert_eq!(r.stage("k3s-started", t1), Step::Waiting);
        assert_eq!(r.stage("gateway-ready", t1), Step::Probe);
        assert_eq!(r.deadline(), None);
        assert_eq!(r.awaited(), None);
    }

    #[test]
    fn a_plain_workload_is_ready_when_it_starts_and_a_silent_guest_at_its_first_stage() {
        let now = Instant::now();
        let mut r = Readiness::new(Duration::from_secs(1));
        r.hello(&stages(&["workload-started"]), now);
        assert_eq!(r.stage("workload-started", now), Step::Ready);
        let mut silent = Readiness::new(Duration::from_secs(1));
        silent.hello(&[], now);
        assert_eq!(silent.stage("anything", now), Step::Ignored, "not a stage");
        assert_eq!(silent.stage(stage::K3S_STARTED, now), Step::Ready);
        assert_eq!(
            silent.stage(stage::NODE_READY, now),
            Step::Ignored,
            "after ready"
        );
    }

    /// A hostile guest announcing thousands of names, repeating stages and sending unknown
    /// ones: only the known announced stages count, each once.
    #[test]
    fn repeated_unknown_and_late_stages_are_ignored() {
        let now = Instant::now();
        let mut r = Readiness::new(Duration::from_secs(1));
        let mut announced: Vec<String> = (0..10_000).map(|i| format!("s{i}")).collect();
        announced.extend(stages(&[stage::WORKLOAD_STARTED, stage::WORKLOAD_STARTED]));
        announced.push(stage::K3S_STARTED.into());
        r.hello(&announced, now);
        assert_eq!(
            r.expected,
            stages(&[stage::WORKLOAD_STARTED, stage::K3S_STARTED])
        );
        assert_eq!(r.stage(stage::WORKLOAD_STARTED, now), Step::Waiting);
        for _ in 0..1000 {
            assert_eq!(r.stage(stage::WORKLOAD_STARTED, now), Step::Ignored);
            assert_eq!(r.stage("s1", now), Step::Ignored);
            assert_eq!(
                r.stage(stage::NODE_READY, now),
                Step::Ignored,
                "not announced"
            );
        }
        assert_eq!(r.stage(stage::K3S_STARTED, now), Step::Ready);
        assert_eq!(r.stage(stage::K3S_STARTED, now), Step::Ignored);
        assert_eq!(r.reached.len(), 2);
    }

    #[test]
    fn a_quiet_listener_answers_a_resetting_or_talking_one_does_not() {
        // A server that accepts and waits, like TLS waiting for the client's hello.
        let quiet = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = quiet.local_addr().expect("addr").port();
        let keep = std::thread::spawn(move || {
            let conn = quiet.accept();
            std::thread::sleep(Duration::from_millis(500));
            drop(conn);
        });
        assert!(gateway_answers(port));
        keep.join().expect("thread");
        // One that accepts and closes at once: what a forwarder does when nothing listens inside.
        let closing = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closing.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            if let Ok((c, _)) = closing.accept() {
                drop(c);
            }
        });
        assert!(!gateway_answers(port));
        // Nothing at all.
        let gone = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = gone.local_addr().expect("addr").port();
        drop(gone);
        assert!(!gateway_answers(port));
        assert!(!wait_for_gateway(port, Duration::from_millis(300)));
    }
}
