//! Kernel command-line options that spare an x86_64 guest under TCG (qemu's software emulation)
//! the boot work an emulated CPU makes expensive. Each was found in `cargo xtask bench boot`'s
//! kernel profile, by sampling the guest's instruction pointer or with gdb on qemu's gdbstub,
//! and is kept because it measured faster; none changes what the guest can do. Under KVM these costs are small and the
//! defaults are kept. (The guest's clock under TCG is [`super::tsc`]'s.)
//!
//! - `noapictimer`: without the TSC-deadline mode (KVM and real CPUs have it; TCG does not) the
//!   kernel counts the local APIC timer against jiffies for 100 ms and checks the result for
//!   another 100 ms, about a fifth of the kernel's boot. Without it the ticks come from the one
//!   global timer, broadcast to the other vCPUs: an interrupt per tick per busy vCPU.
//! - `noreplace-smp`: a kernel that boots on one CPU rewrites every `lock` prefix in its text
//!   into a no-op, one `text_poke` each (about 6700 in our build), and under TCG each write to
//!   translated code throws translations away: 100 ms of the kernel's boot, for instructions
//!   whose `lock` costs nothing measurable here. With more than one vCPU the kernel skips the
//!   rewrite anyway.
//! - `no_timer_check`: the kernel proves the IO-APIC routes the timer interrupt by busy-waiting
//!   for jiffies to advance, 18 ms of the boot here against 1 ms without. Linux skips the check
//!   itself on KVM and Hyper-V guests, whose timers are virtual too.

/// Given to every x86_64 guest qemu runs under TCG, whatever the host's architecture.
pub const X86_64_OPTIONS: &[&str] = &["noapictimer", "noreplace-smp", "no_timer_check"];
