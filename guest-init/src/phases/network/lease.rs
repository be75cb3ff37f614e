//! Keeps the lease the `network` phase got, for as long as the VM runs: at T1 it asks the server
//! that gave it (unicast) to extend it, at T2 any server (broadcast); a NAK or expiry gives the
//! address up and starts a new exchange, with the static plan in place until one succeeds,
//! because k3s needs an address and a default route at all times. It runs on its own thread and
//! never holds up boot or the workload; every step is reported as a `log` event.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use openshell_shared::config::Network;
use openshell_shared::Level;

use super::configure::{self, describe_time};
use super::guard;
use crate::netlink;
use openshell_init::dhcp::{self, Lease, Reply};

/// A lease on a link, and when it was asked for (lease times count from the request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    pub ifname: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub lease: Lease,
    pub since: Instant,
}

pub struct Keeper {
    pub bound: Bound,
    pub cfg: Network,
    /// Rewritten when a renewal changes the nameservers.
    pub resolv: PathBuf,
    pub log: Box<dyn Fn(Level, String) + Send>,
}

/// How one attempt to extend the lease ended.
#[derive(Debug)]
enum Extended {
    Yes(Lease, Instant),
    Nak,
    NoAnswer,
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Unicast to the server that gave the lease.
    Renew,
    /// Broadcast to any server.
    Rebind,
}

/// Waits between retransmissions: half the time left (RFC 2131 4.4.5), at least one second so a
/// short lease is not flooded, at most a minute.
pub fn retransmit_after(left: Duration) -> Duration {
    (left / 2).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Waits between new exchanges while no server answers at all.
const RESTART_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

impl Keeper {
    /// Starts keeping the lease on a thread of its own; a lease that never expires needs no
    /// thread (and a thread is worth sparing at boot under emulation): that is said, and `None`.
    pub fn spawn(self) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
        if self.bound.lease.timers().is_none() {
            self.say_never_expires();
            return Ok(None);
        }
        std::thread::Builder::new()
            .name("dhcp-lease".into())
            .spawn(move || self.run())
            .map(Some)
    }

    fn say_never_expires(&self) {
        self.say(
            Level::Info,
            format!(
                "lease on {} never expires: nothing to renew",
                self.bound.lease.address
            ),
        );
    }

    fn say(&self, level: Level, text: String) {
        (self.log)(level, format!("dhcp: {text}"))
    }

    fn run(mut self) {
        loop {
            let Some(t) = self.bound.lease.timers() else {
                self.say_never_expires();
                return;
            };
            let since = self.bound.since;
            sleep_until(since + t.t1);
            let mut outcome = self.extend(Mode::Renew, since + t.t2);
            if matches!(outcome, Extended::NoAnswer) {
                self.say(
                    Level::Warn,
                    format!(
                        "{} did not answer the renewal of {}: rebinding (broadcast)",
                        self.bound.lease.server, self.bound.lease.address
                    ),
                );
                outcome = self.extend(Mode::Rebind, since + t.expiry);
            }
            match outcome {
                Extended::Yes(lease, at) => self.renewed(lease, at),
                Extended::Nak => {
                    self.say(
                        Level::Warn,
                        format!(
                            "server refused (NAK) to extend {}: giving it up and starting over",
                            self.bound.lease.address
                        ),
                    );
                    self.start_over();
                }
                Extended::NoAnswer => {
                    self.say(
                        Level::Warn,
                        format!(
                            "lease on {} expired with no server answering: giving it up and starting over",
                            self.bound.lease.address
                        ),
                    );
                    self.start_over();
                }
            }
        }
    }

    /// Asks for the lease to be extended until `until`, retransmitting as RFC 2131 says.
    fn extend(&self, mode: Mode, until: Instant) -> Extended {
        let b = &self.bound;
        let sock = match dhcp::socket(&b.ifname) {
            Ok(s) => s,
            Err(e) => {
                self.say(Level::Warn, format!("{e}: cannot renew until it clears"));
                sleep_until(until);
                return Extended::NoAnswer;
            }
        };
        let to = match mode {
            Mode::Renew => SocketAddrV4::new(b.lease.server, 67),
            Mode::Rebind => SocketAddrV4::new(Ipv4Addr::BROADCAST, 67),
        };
        let xid = dhcp::random_xid();
        let msg = dhcp::extend(xid, &b.mac, b.lease.address);
        let Ok(bytes) = dhcp::encode(&msg) else {
            return Extended::NoAnswer;
        };
        let mut buf = vec![0u8; 1500];
        loop {
            let now = Instant::now();
            if now >= until {
                return Extended::NoAnswer;
            }
            let sent = Instant::now();
            // A send error (no route for a moment) is like a lost packet: wait and resend.
            let _ = sock.send_to(&bytes, to);
            let round_end = (now + retransmit_after(until - now)).min(until);
            while let Some(left) = round_end.checked_duration_since(Instant::now()) {
                if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
                    break;
                }
                let Ok((n, _)) = sock.recv_from(&mut buf) else {
                    break;
                };
                match dhcp::classify(&buf[..n], xid, &b.mac) {
                    Some(Reply::Ack { lease, .. }) => return Extended::Yes(lease, sent),
                    Some(Reply::Nak) => return Extended::Nak,
                    // Offers and foreign or malformed packets: not for this exchange.
                    _ => {}
                }
            }
        }
    }

    /// Takes an extended lease into use; only what changed is touched.
    fn renewed(&mut self, lease: Lease, at: Instant) {
        let old = self.bound.lease.clone();
        let (ifname, index) = (self.bound.ifname.clone(), self.bound.index);
        if lease.address != old.address || lease.prefix != old.prefix {
            if let Err(e) = configure::apply_lease(&ifname, index, &lease) {
                self.say(Level::Error, format!("cannot apply the renewed lease: {e}"));
                return;
            }
            let _ = netlink::delete_address(index, old.address, old.prefix);
            self.say(
                Level::Warn,
                format!(
                    "address changed from {} to {} on renewal: k3s's node IP is now stale",
                    old.address, lease.address
                ),
            );
        } else if lease.router != old.router || lease.mtu != old.mtu {
            if let Err(e) = configure::apply_lease(&ifname, index, &lease) {
                self.say(Level::Error, format!("cannot apply the renewed lease: {e}"));
            }
        }
        if lease.dns != old.dns {
            self.write_dns(&lease.dns);
        }
        if lease.router != old.router {
            self.guard_router(lease.router);
        }
        self.say(
            Level::Info,
            format!(
                "renewed {} from {}: lease {}{}",
                lease.address,
                lease.server,
                describe_time(lease.lease_secs),
                lease
                    .timers()
                    .map(|t| format!(", next renewal in {:.1} s", t.t1.as_secs_f64()))
                    .unwrap_or_default()
            ),
        );
        self.bound.lease = lease;
        self.bound.since = at;
    }

    /// Redoes the refusals for a new router: passt may map it to the host's loopback. A
    /// failure is an error on the console and the host's log; the old router's stay.
    fn guard_router(&self, router: Option<Ipv4Addr>) {
        match guard::install(&self.cfg, router) {
            Ok(_) => self.say(
                Level::Info,
                format!(
                    "refusals redone for router {}",
                    router
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "none".into())
                ),
            ),
            Err(e) => self.say(Level::Error, e.to_string()),
        }
    }

    fn write_dns(&self, offered: &[Ipv4Addr]) {
        let dns = configure::usable_dns(offered, &self.cfg.fallback_dns, |l, t| self.say(l, t));
        if let Err(e) = configure::write_resolv_conf(&self.resolv, &dns) {
            self.say(Level::Error, e.to_string());
        }
    }

    /// Gives the address up and runs new exchanges until one succeeds; the static plan holds the
    /// link meanwhile.
    fn start_over(&mut self) {
        let (ifname, index, mac) = (self.bound.ifname.clone(), self.bound.index, self.bound.mac);
        let old = self.bound.lease.clone();
        if let Err(e) = netlink::delete_address(index, old.address, old.prefix) {
            self.say(Level::Warn, format!("cannot remove {}: {e}", old.address));
        }
        let mut fallback_on = false;
        let mut pause = RESTART_BACKOFF.0;
        loop {
            match configure::exchange(&ifname, index, &mac, &self.cfg) {
                Ok(ex) => {
                    let since = Instant::now() - ex.elapsed;
                    if let Err(e) = configure::apply_lease(&ifname, index, &ex.lease) {
                        self.say(Level::Error, format!("cannot apply the new lease: {e}"));
                    } else {
                        let plan = &self.cfg.fallback;
                        if fallback_on && plan.address != ex.lease.address {
                            let _ = netlink::delete_address(index, plan.address, plan.prefix);
                        }
                        self.write_dns(&ex.lease.dns);
                        if fallback_on || ex.lease.router != old.router {
                            self.guard_router(ex.lease.router);
                        }
                        self.say(
                            if ex.lease.address == old.address {
                                Level::Info
                            } else {
                                Level::Warn
                            },
                            format!(
                                "new lease {}/{} from {} (was {}), lease {}",
                                ex.lease.address,
                                ex.lease.prefix,
                                ex.lease.server,
                                old.address,
                                describe_time(ex.lease.lease_secs)
                            ),
                        );
                        self.bound.lease = ex.lease;
                        self.bound.since = since;
                        return;
                    }
                }
                Err(e) if !fallback_on => {
                    let plan = self.cfg.fallback.clone();
                    match configure::apply_static(&ifname, index, &plan) {
                        Ok(_) => self.say(
                            Level::Warn,
                            format!(
                                "{e}: static plan {}/{} until a server answers",
                                plan.address, plan.prefix
                            ),
                        ),
                        Err(e2) => self.say(Level::Error, format!("{e}; static plan: {e2}")),
                    }
                    self.write_dns(&plan.dns);
                    if plan.gateway != old.router {
                        self.guard_router(plan.gateway);
                    }
                    fallback_on = true;
                }
                Err(_) => {}
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(RESTART_BACKOFF.1);
        }
    }
}

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retransmissions_halve_the_time_left_within_bounds() {
        let s = Duration::from_secs;
        assert_eq!(retransmit_after(s(600)), s(60), "capped at a minute");
        assert_eq!(retransmit_after(s(30)), s(15));
        assert_eq!(retransmit_after(s(1)), s(1), "never below a second");
        assert_eq!(retransmit_after(Duration::ZERO), s(1));
    }

    fn keeper(lease_secs: u32, said: std::sync::Arc<std::sync::Mutex<Vec<String>>>) -> Keeper {
        Keeper {
            bound: Bound {
                ifname: "osh-none0".into(),
                index: 0,
                mac: [2, 0, 0, 0, 0, 1],
                lease: Lease {
                    address: Ipv4Addr::new(192, 0, 2, 2),
                    prefix: 24,
                    router: None,
                    dns: Vec::new(),
                    server: Ipv4Addr::new(192, 0, 2, 1),
                    lease_secs,
                    mtu: None,
                    renew_secs: None,
                    rebind_secs: None,
                },
                since: Instant::now(),
            },
            cfg: Network::default(),
            resolv: PathBuf::from("/nonexistent/resolv.conf"),
            log: Box::new(move |_, text| said.lock().expect("log").push(text)),
        }
    }

    /// An infinite lease (passt's) is said once and gets no thread; a finite one gets its
    /// keeper thread, which sleeps until T1.
    #[test]
    fn only_a_lease_that_expires_is_kept_on_a_thread() {
        let said = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let none = keeper(dhcp::INFINITE, said.clone()).spawn().expect("spawn");
        assert!(none.is_none());
        assert_eq!(
            *said.lock().expect("said"),
            vec!["dhcp: lease on 192.0.2.2 never expires: nothing to renew".to_string()]
        );
        let kept = keeper(3600, said.clone()).spawn().expect("spawn");
        let kept = kept.expect("a keeper thread for a one-hour lease");
        assert!(!kept.is_finished());
        assert_eq!(said.lock().expect("said").len(), 1, "nothing more said");
    }
}
