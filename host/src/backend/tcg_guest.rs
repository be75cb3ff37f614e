//! Kernel command-line options for guests under TCG (qemu's software emulation), none of which
//! changes what the guest can do; under KVM (and HVF) the defaults are kept.
//!
//! Every arch, for correctness ([`OPTIONS`]):
//!
//! - `init_on_alloc=1`: TCG runs translations of guest code, found by the code's virtual and
//!   physical address, and throws a page's translations away when the guest CPU writes to that
//!   page. vhost-user backends write guest memory directly: virtiofsd puts a file's contents into
//!   page-cache pages that may have held another program's code, and qemu never hears of it. A
//!   program mapped at the same addresses as the page's earlier one (Debian's Go programs are
//!   not position-independent: all start at 0x400000) then runs the earlier program's
//!   translations: containerd, ctr, runc and the shim crashed under TCG with "unexpected fault
//!   address" or "unexpected return pc" in 5 of 480 starts with the page cache dropped between
//!   them, 0 of 480 with this option. Zeroing each page as it is allocated is a guest CPU write
//!   that retires the page's stale translations before the backend fills it. Its cost: boots
//!   unchanged (five pairs, within the noise), the containerd VM tests 146 -> 151 s; the bench's
//!   busybox shell init, which runs a program from virtio-fs for each step (and virtiofsd's
//!   `cache=auto` has the guest read a file again at each open), 0.9 -> 1.85 s. On aarch64 the
//!   crashes remain with it: arm64 zeroes pages with `DC ZVA`, which does not seem to retire the
//!   translations under qemu 7.2; `page_poison=1` does, but costs about 400 ms of every aarch64
//!   boot, so only the VM tests that run Go programs there give it (docs/testing.md).
//!
//! x86_64, for speed ([`X86_64_OPTIONS`]). Each was found in `cargo xtask bench boot`'s kernel
//! profile, by sampling the guest's instruction pointer or with gdb on qemu's gdbstub, and is kept
//! because it measured faster. (The guest's clock under TCG is [`super::tsc`]'s.)
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

/// Given to every guest qemu runs under TCG.
pub const OPTIONS: &[&str] = &["init_on_alloc=1"];

/// Given to every x86_64 guest qemu runs under TCG, whatever the host's architecture.
pub const X86_64_OPTIONS: &[&str] = &["noapictimer", "noreplace-smp", "no_timer_check"];
