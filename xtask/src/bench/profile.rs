//! `cargo xtask bench profile`: what the guest executes while init boots, under qemu TCG, by
//! function. The boot benchmark says how long init takes; this says which code, init's or the
//! kernel's on init's behalf, the emulator spent that time running.
//!
//! One x86_64 boot of the base profile with an unstripped init. qemu logs every translation
//! from the start (`-d in_asm`, which gives each block's instruction count); when init prints
//! its first console line, qemu's monitor switches on `exec,nochain` as well (every block
//! executed from then on). `-icount` ties the guest's clock to instructions, so the logging's
//! slowness does not multiply timer interrupts, and `norandmaps` keeps init at one address.
//! Each executed block is weighed by its instructions and named with `nm` (init and vmlinux);
//! kernel blocks are also charged to the init function that was running when the kernel was
//! entered (a system call or a fault), which says what each part of init asks of the kernel.
//! x86_64 only: the aarch64 kernel build keeps no vmlinux to name its functions.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use openshell_shared::Arch;

use crate::artifacts::artifacts;
use crate::error::{Error, Result};
use crate::{cache, tools, up};

/// Kernel text on x86_64 lives in the top half of the address space.
const KERNEL_START: u64 = 0xffff_0000_0000_0000;
/// Where `norandmaps` puts a static-pie init: just under this, by its size.
const INIT_REGION: std::ops::Range<u64> = 0x7fff_f7a0_0000..0x7fff_f7e0_0000;

pub fn run(top: usize) -> Result<()> {
    let arch = Arch::X86_64;
    let a = artifacts(arch)?;
    // The x86_64 kernel `up` boots is the unstripped ELF: its symbols name the kernel's blocks.
    let vmlinux = a.kernel.clone();
    let init = tools::init_unstripped(arch)?;
    let root = up::instance_root("profile", arch, &a.rootfs)?;
    let target = root.join("sbin/openshell-init");
    std::fs::copy(&init, &target).map_err(|e| Error::io("copy", &target, e))?;
    let dir = cache::root().join("profile");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
    let (log, monitor, console) = (
        dir.join("qemu.log"),
        dir.join("mon.sock"),
        dir.join("console.log"),
    );
    for stale in [&log, &monitor, &console] {
        let _ = std::fs::remove_file(stale);
    }
    let wrapper = dir.join("qemu");
    let script = format!(
        "#!/bin/sh\nexec qemu-system-x86_64 \"$@\" -icount shift=3,sleep=on -d in_asm -D {} -monitor unix:{},server=on,wait=off\n",
        log.display(),
        monitor.display()
    );
    write_executable(&wrapper, &script)?;
    let host = tools::host(true)?;
    eprintln!("xtask profile: booting x86_64 with qemu logging (about a minute)");
    let mut child = up::host_up(&host, arch, "profile", &a, &root)
        .arg("--qemu")
        .arg(&wrapper)
        .arg("--console-log")
        .arg(&console)
        .args([
            "--net",
            "none",
            "--cmdline-extra",
            "norandmaps",
            "--exec",
            "/bin/true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::msg(format!("cannot run openshell-host: {e}")))?;
    let switched = switch_on_at_init(&console, &monitor, Duration::from_secs(120));
    let status = child
        .wait()
        .map_err(|e| Error::msg(format!("waiting for openshell-host: {e}")))?;
    switched?;
    if !status.success() {
        return Err(Error::msg(format!(
            "the profiled boot failed ({status}); console: {}",
            console.display()
        )));
    }
    let trace = Trace::read(&log)?;
    let kernel = Symbols::from_nm(&vmlinux, false)?;
    let own = Symbols::from_nm(&init, true)?;
    let base = trace
        .init_base(&own)
        .ok_or_else(|| Error::msg("no executed block matches init's functions"))?;
    print!("{}", trace.report(&own, base, &kernel, top));
    Ok(())
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).map_err(|e| Error::io("write", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io("chmod", path, e))
}

/// Waits for init's first console line, then asks qemu's monitor to log executed blocks too.
fn switch_on_at_init(console: &Path, monitor: &Path, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !std::fs::read(console).is_ok_and(|b| b.windows(14).any(|w| w == b"openshell-init")) {
        if Instant::now() > deadline {
            return Err(Error::msg(format!(
                "init never wrote to {}",
                console.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut mon = std::os::unix::net::UnixStream::connect(monitor)
        .map_err(|e| Error::io("connect to", monitor, e))?;
    mon.write_all(b"log in_asm,exec,nochain\n")
        .map_err(|e| Error::io("write to", monitor, e))?;
    // The monitor acts on the command before the boot goes much further; keep the connection
    // open until it has read it.
    std::thread::sleep(Duration::from_millis(50));
    Ok(())
}

/// What qemu logged: each block's instruction count (from its first translation) and how often
/// each block was entered once execution logging was on, in order.
#[derive(Debug, Default)]
pub struct Trace {
    pub sizes: HashMap<u64, u32>,
    /// Block start addresses in execution order.
    pub executed: Vec<u64>,
}

impl Trace {
    fn read(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
        let mut t = Trace::default();
        let mut block: Option<(u64, u32)> = None;
        for line in std::io::BufReader::new(file).split(b'\n') {
            let line = line.map_err(|e| Error::io("read", path, e))?;
            t.line(&line, &mut block);
        }
        t.close(&mut block);
        Ok(t)
    }

    /// One line of qemu's log: a translated instruction (`0x<pc>: ...`), the end of a block, or
    /// an executed block (`Trace N: 0x<host> [<cs_base>/<pc>/<flags>/<cflags>] ...`).
    pub fn line(&mut self, line: &[u8], block: &mut Option<(u64, u32)>) {
        if let Some(rest) = line.strip_prefix(b"Trace ") {
            self.close(block);
            let pc = rest
                .iter()
                .position(|b| *b == b'[')
                .and_then(|i| rest[i + 1..].split(|b| *b == b'/').nth(1))
                .and_then(hex);
            if let Some(pc) = pc {
                self.executed.push(pc);
            }
        } else if let Some(rest) = line.strip_prefix(b"0x") {
            let Some(pc) = rest.split(|b| *b == b':').next().and_then(hex) else {
                return;
            };
            match block {
                Some((_, n)) => *n += 1,
                None => *block = Some((pc, 1)),
            }
        } else {
            self.close(block);
        }
    }

    fn close(&mut self, block: &mut Option<(u64, u32)>) {
        if let Some((pc, n)) = block.take() {
            self.sizes.entry(pc).or_insert(n);
        }
    }

    /// Where init was loaded: the page-aligned base in [`INIT_REGION`] at which most executed
    /// user blocks start exactly on one of init's functions.
    pub fn init_base(&self, own: &Symbols) -> Option<u64> {
        let starts: std::collections::HashSet<u64> = own.list.iter().map(|s| s.0).collect();
        let mut user: Vec<u64> = self
            .executed
            .iter()
            .copied()
            .filter(|pc| (INIT_REGION.start..KERNEL_START).contains(pc))
            .collect();
        user.sort_unstable();
        user.dedup();
        (INIT_REGION.start..INIT_REGION.end)
            .step_by(0x1000)
            .map(|base| {
                let hits = user
                    .iter()
                    .filter(|pc| pc.checked_sub(base).is_some_and(|o| starts.contains(&o)))
                    .count();
                (hits, base)
            })
            .filter(|(hits, _)| *hits > 0)
            .max()
            .map(|(_, base)| base)
    }

    /// The report: totals, the functions that ran most, and what init's functions asked of the
    /// kernel.
    pub fn report(&self, own: &Symbols, base: u64, kernel: &Symbols, top: usize) -> String {
        let mut by_function: HashMap<String, u64> = HashMap::new();
        let mut by_caller: HashMap<String, u64> = HashMap::new();
        let (mut k, mut i, mut other) = (0u64, 0u64, 0u64);
        let mut caller = String::from("(before init ran)");
        let extent = own.extent();
        for &pc in &self.executed {
            let weight = u64::from(self.sizes.get(&pc).copied().unwrap_or(1));
            if pc >= KERNEL_START {
                k += weight;
                let name = kernel.name(pc).unwrap_or("?");
                *by_function.entry(format!("kernel {name}")).or_default() += weight;
                *by_caller.entry(caller.clone()).or_default() += weight;
            } else if let Some(off) = pc.checked_sub(base).filter(|off| *off < extent) {
                i += weight;
                let name = own.name(off).unwrap_or("(unnamed: musl's assembly)");
                *by_function.entry(format!("init   {name}")).or_default() += weight;
                // musl's system call wrappers say nothing about who called them.
                if name.contains("::") || name.starts_with('<') {
                    caller = name.to_string();
                }
            } else {
                other += weight;
                caller = String::from("(another process)");
            }
        }
        let total = (k + i + other).max(1);
        let pct = |n: u64| n as f64 * 100.0 / total as f64;
        let mut out = format!(
            "guest instructions executed from init's first console line to power-off: {total}\n\
             kernel {k} ({:.1}%), init {i} ({:.1}%), other processes {other} ({:.1}%)\n\
             blocks translated: {}\n\nmost executed functions:\n",
            pct(k),
            pct(i),
            pct(other),
            self.sizes.len()
        );
        for (name, n) in ranked(by_function, top) {
            out.push_str(&format!("{n:>10} {:>5.1}%  {name}\n", pct(n)));
        }
        out.push_str("\nkernel instructions by the init function that entered the kernel:\n");
        for (name, n) in ranked(by_caller, top) {
            out.push_str(&format!("{n:>10} {:>5.1}%  {name}\n", pct(n)));
        }
        out
    }
}

fn ranked(map: HashMap<String, u64>, top: usize) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = map.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(top);
    v
}

fn hex(b: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(b).ok()?.trim();
    u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// Function symbols of a binary, by address: (start, size, name).
#[derive(Debug, Default)]
pub struct Symbols {
    pub list: Vec<(u64, u64, String)>,
}

impl Symbols {
    /// `nm --defined-only -S` (demangled): text symbols only. `sized`: a symbol covers only its
    /// size (init: musl's assembly has none, and is then unnamed); else it reaches the next one.
    fn from_nm(binary: &Path, sized: bool) -> Result<Self> {
        let out = Command::new("nm")
            .args(["-C", "--defined-only", "-S", "-n"])
            .arg(binary)
            .output()
            .map_err(|e| Error::msg(format!("cannot run nm on {}: {e}", binary.display())))?;
        if !out.status.success() {
            return Err(Error::msg(format!(
                "nm {}: {}",
                binary.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(Self::parse(&String::from_utf8_lossy(&out.stdout), sized))
    }

    pub fn parse(nm: &str, sized: bool) -> Self {
        let mut list = Vec::new();
        for line in nm.lines() {
            let mut f = line.splitn(4, ' ');
            let (Some(addr), Some(second), Some(third)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            // With a size: "addr size type name"; without: "addr type name".
            let (size, kind, name) = match f.next() {
                Some(name) => (u64::from_str_radix(second, 16).ok(), third, name),
                None => (None, second, third),
            };
            if !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            let size = if sized { size.unwrap_or(0) } else { u64::MAX };
            list.push((addr, size, name.to_string()));
        }
        list.sort_by_key(|s| s.0);
        Symbols { list }
    }

    /// Where the last function ends.
    pub fn extent(&self) -> u64 {
        self.list
            .iter()
            .map(|(start, size, _)| start.saturating_add((*size).max(1)))
            .max()
            .unwrap_or(0)
    }

    pub fn name(&self, addr: u64) -> Option<&str> {
        let i = self.list.partition_point(|s| s.0 <= addr).checked_sub(1)?;
        let (start, size, name) = &self.list[i];
        (addr - start < (*size).max(1)).then_some(name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(log: &str) -> Trace {
        let mut t = Trace::default();
        let mut block = None;
        for line in log.lines() {
            t.line(line.as_bytes(), &mut block);
        }
        t.close(&mut block);
        t
    }

    const LOG: &str = "----------------
IN: 
0xffffffff81000010:  31 c0   xorl %eax, %eax
0xffffffff81000012:  c3      retq

----------------
IN: 
0x7ffff7c10020:  48 89 e5   movq %rsp, %rbp
0x7ffff7c10023:  0f 05      syscall

Trace 0: 0x7f2a10000100 [0000000000000000/00007ffff7c10020/18c0c2b3/ff000200] 
Trace 0: 0x7f2a10000200 [0000000000000000/ffffffff81000010/00000000/ff000200] 
Trace 0: 0x7f2a10000200 [0000000000000000/ffffffff81000010/00000000/ff000200] 
----------------
IN: 
0x400100:  c3   retq

Trace 0: 0x7f2a10000300 [0000000000000000/0000000000400100/00000000/ff000200] 
Trace 0: 0x7f2a10000200 [0000000000000000/ffffffff81000010/00000000/ff000200] 
";

    #[test]
    fn blocks_are_sized_and_executions_listed_in_order() {
        let t = trace(LOG);
        assert_eq!(t.sizes.get(&0xffff_ffff_8100_0010), Some(&2));
        assert_eq!(t.sizes.get(&0x7fff_f7c1_0020), Some(&2));
        assert_eq!(t.sizes.get(&0x40_0100), Some(&1));
        assert_eq!(
            t.executed,
            vec![
                0x7fff_f7c1_0020,
                0xffff_ffff_8100_0010,
                0xffff_ffff_8100_0010,
                0x40_0100,
                0xffff_ffff_8100_0010
            ]
        );
    }

    #[test]
    fn nm_output_with_and_without_sizes() {
        let own = Symbols::parse(
            "0000000000010020 0000000000000010 T openshell_init::phases::mounts::run\n\
             0000000000010100 T memcpy\n\
             0000000000020000 0000000000000008 D some_data\n",
            true,
        );
        assert_eq!(
            own.name(0x10020),
            Some("openshell_init::phases::mounts::run")
        );
        assert_eq!(
            own.name(0x1002f),
            Some("openshell_init::phases::mounts::run")
        );
        assert_eq!(own.name(0x10030), None, "past the symbol's size");
        assert_eq!(
            own.name(0x10100),
            Some("memcpy"),
            "unsized: its first byte only"
        );
        assert_eq!(own.name(0x20000), None, "data is not a function");
        let kernel = Symbols::parse(
            "ffffffff81000000 T _stext\nffffffff81000010 t do_it\n",
            false,
        );
        assert_eq!(kernel.name(0xffff_ffff_8100_0012), Some("do_it"));
        assert_eq!(kernel.name(0xffff_ffff_8000_0000), None);
    }

    #[test]
    fn init_is_found_and_kernel_work_is_charged_to_its_caller() {
        let t = trace(LOG);
        let own = Symbols::parse(
            "0000000000010020 0000000000000010 T openshell_init::phases::mounts::run\n",
            true,
        );
        let base = t.init_base(&own).expect("base");
        assert_eq!(base, 0x7fff_f7c0_0000);
        let kernel = Symbols::parse("ffffffff81000010 t do_mount\n", false);
        let report = t.report(&own, base, &kernel, 10);
        // init 2, kernel 2 + 2 (charged to mounts), busybox 1, kernel 2 (after busybox).
        assert!(report.contains(": 9\n"), "{report}");
        assert!(
            report.contains("kernel 6 (66.7%), init 2 (22.2%), other processes 1 (11.1%)"),
            "{report}"
        );
        assert!(
            report.contains("         4  44.4%  openshell_init::phases::mounts::run"),
            "{report}"
        );
        assert!(
            report.contains("         2  22.2%  (another process)"),
            "{report}"
        );
        assert!(report.contains("kernel do_mount"), "{report}");
    }
}
