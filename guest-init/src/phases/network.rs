//! The `network` phase: the guest's address, default route, MTU and DNS. DHCP on the configured
//! interface (our client, `openshell_init::dhcp`); no lease in time means the configured static
//! plan, said out loud, because k3s needs a default route; no network device at all means a dummy
//! interface with an address and a default route, so k3s still finds a node IP.
//!
//! `/etc/resolv.conf` is replaced atomically (left alone when it already says the same) and holds
//! only nameservers k3s accepts (no loopback, multicast or link-local ones, which make k3s fall
//! back to 8.8.8.8).
//!
//! A DHCP lease is then kept for as long as the VM runs by [`lease`], on its own thread. What
//! both do to the link and to `resolv.conf` is [`configure`].
//!
//! Before any of that, [`guard`] refuses TCP to `network.blocked_tcp` (gvproxy's control API,
//! which can open ports on the user's host) and everything to the host's loopback but the listed
//! host ports, in an nftables table; once the lease names the router, the table is redone with
//! the router in it, and the host is told what holds (`network_guarded`). The phase is fatal and
//! fails closed: when the refusals cannot be installed the link is never brought up (or, for the
//! router's, k3s never starts) and the boot stops, naming what the kernel refused; a guest whose
//! network cannot be configured is no gateway either.

pub mod configure;
pub mod guard;
pub mod lease;

use std::net::Ipv4Addr;
use std::time::Instant;

use netlink_packet_route::link::InfoKind;
use openshell_shared::config::{Network, StaticPlan};
use openshell_shared::Level;

use crate::context::Ctx;
use crate::engine::phase::{Done, Phase, PhaseResult};
use crate::netlink::{self, NetlinkError};
use configure::{
    apply_lease, apply_static, describe_time, exchange, link_err, usable_dns, write_resolv_conf,
    NetworkError,
};
use openshell_init::clock::Stopwatch;

pub const PHASE: Phase = Phase {
    name: "network",
    after: &["config"],
    fatal: true,
    waits: true,
    purpose:
        "refusals (gvproxy's API, the host's loopback), then address, route, MTU and DNS by DHCP (static plan when no lease, dummy without a device)",
    run,
};

const DUMMY: &str = "dummy0";

/// What the phase configured, for the report and for k3s (`--node-ip`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configured {
    pub ifname: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub how: String,
    /// The lease behind this configuration, when DHCP gave one: the keeper renews it.
    pub lease: Option<lease::Bound>,
}

fn run(ctx: &Ctx) -> PhaseResult {
    let cfg = &ctx.config().network;
    // First: the guest never has a network without the refusals.
    let mut denied = guard::install(cfg, None)?;
    let mut done = bring_up(cfg, |level, text| ctx.reporter.log(level, text))?;
    // Again, with the router, only when it adds to what holds (passt mapping it to the host):
    // a second batch is kernel work worth sparing at boot under emulation.
    if guard::guarded(cfg, done.router) != guard::guarded(cfg, None) {
        denied = guard::install(cfg, done.router)?;
    }
    ctx.reporter.emit(guard::confirmation(cfg, done.router));
    let _ = ctx.node_ip.set(done.address);
    let dns = usable_dns(&done.dns, &cfg.fallback_dns, |level, text| {
        ctx.reporter.log(level, text)
    });
    let resolv = ctx.path("/etc/resolv.conf");
    let _ = write_resolv_conf(&resolv, &dns)?;
    if let Some(bound) = done.lease.take() {
        let reporter = std::sync::Arc::clone(&ctx.reporter);
        let keeper = lease::Keeper {
            bound,
            cfg: cfg.clone(),
            resolv,
            log: Box::new(move |level, text| reporter.log(level, text)),
        };
        if let Err(e) = keeper.spawn() {
            ctx.reporter.log(
                Level::Warn,
                format!("cannot start the DHCP lease keeper: {e}"),
            );
        }
    }
    Ok(Done::Ok(Some(format!(
        "{} {}/{} via {} dns {} ({}){denied}",
        done.ifname,
        done.address,
        done.prefix,
        done.router
            .map(|r| r.to_string())
            .unwrap_or_else(|| "dev".into()),
        dns.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(","),
        done.how
    ))))
}

/// Configures the calling thread's network namespace per `cfg`. `log` hears about fallbacks.
pub fn bring_up(
    cfg: &Network,
    mut log: impl FnMut(Level, String),
) -> Result<Configured, NetworkError> {
    let links = netlink::links().map_err(NetworkError::List)?;
    let Some(link) = links.iter().find(|l| l.name == cfg.interface) else {
        log(
            Level::Warn,
            format!(
                "no {} device: using {DUMMY} {}/{}",
                cfg.interface, cfg.no_device.address, cfg.no_device.prefix
            ),
        );
        let _ = netlink::delete_link(DUMMY);
        netlink::create_link(DUMMY, InfoKind::Dummy, None).map_err(link_err(DUMMY, "create"))?;
        let dummy = netlink::links()
            .map_err(NetworkError::List)?
            .into_iter()
            .find(|l| l.name == DUMMY)
            .ok_or_else(|| NetworkError::Link {
                ifname: DUMMY.into(),
                what: "find after create",
                source: NetlinkError::BadReply("not listed".into()),
            })?;
        return bring_up_static(
            DUMMY,
            dummy.index,
            &cfg.no_device,
            "no network device".into(),
        );
    };
    netlink::set_up_with_mtu(&link.name, None).map_err(link_err(&link.name, "bring up"))?;
    let mac = link.mac.unwrap_or_default();
    let watch = Stopwatch::start();
    match exchange(&link.name, link.index, &mac, cfg) {
        Ok(ex) => {
            let lease = &ex.lease;
            apply_lease(&link.name, link.index, lease)?;
            Ok(Configured {
                ifname: link.name.clone(),
                address: lease.address,
                prefix: lease.prefix,
                router: lease.router,
                dns: lease.dns.clone(),
                how: format!(
                    "DHCP from {} in {:.2} ms (exchange {:.2} ms, first answer after {:.2} ms), {} DISCOVER(s){}, lease {}{}",
                    lease.server,
                    watch.elapsed_us() as f64 / 1000.0,
                    ex.elapsed.as_secs_f64() * 1000.0,
                    ex.first_answer.unwrap_or_default().as_secs_f64() * 1000.0,
                    ex.discovers,
                    if ex.rapid { " (rapid commit)" } else { "" },
                    describe_time(lease.lease_secs),
                    lease.mtu.map(|m| format!(", MTU {m}")).unwrap_or_default()
                ),
                lease: Some(lease::Bound {
                    ifname: link.name.clone(),
                    index: link.index,
                    mac,
                    since: Instant::now() - ex.elapsed,
                    lease: ex.lease,
                }),
            })
        }
        Err(e) => {
            log(
                Level::Warn,
                format!(
                    "{e}: falling back to the static plan {}/{} via {}",
                    cfg.fallback.address,
                    cfg.fallback.prefix,
                    cfg.fallback
                        .gateway
                        .map(|g| g.to_string())
                        .unwrap_or_else(|| "dev".into())
                ),
            );
            bring_up_static(
                &link.name,
                link.index,
                &cfg.fallback,
                format!("static fallback: {e}"),
            )
        }
    }
}

/// Puts the static `plan` on the link and says so in the phase's terms: `how` for the report,
/// no lease to keep.
fn bring_up_static(
    ifname: &str,
    index: u32,
    plan: &StaticPlan,
    how: String,
) -> Result<Configured, NetworkError> {
    apply_static(ifname, index, plan)?;
    Ok(Configured {
        ifname: ifname.to_string(),
        address: plan.address,
        prefix: plan.prefix,
        router: plan.gateway,
        dns: plan.dns.clone(),
        how,
        lease: None,
    })
}
