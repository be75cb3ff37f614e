//! The kernel's part of a boot, from its own log: one boot of the boot benchmark's VM with
//! `initcall_debug` and the kernel's timestamps on the console, read into the slowest initcalls
//! and the longest silences before init starts (early-boot steps that print nothing while they
//! work, such as a timer calibration). The profile boot is not one of the timed boots: logging
//! every initcall over the emulated serial port slows it down.

use serde_json::Value;

/// What the profile boot adds to the kernel command line (after `quiet`, so it wins).
pub const CMDLINE: &str = "initcall_debug printk.time=1 loglevel=8";
/// How many initcalls and silences the report keeps.
const TOP: usize = 10;
/// The line that ends the kernel's own boot.
const INIT_STARTS: &str = "Run /sbin/openshell-init as init process";

/// One timestamped console line: seconds since the kernel started, and the text after it.
fn stamped(line: &str) -> Option<(f64, &str)> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (t, text) = rest.split_once(']')?;
    Some((t.trim().parse().ok()?, text.trim_start()))
}

/// `initcall NAME+0x../0x.. returned R after N usecs`: the function and its microseconds.
fn initcall(text: &str) -> Option<(String, u64)> {
    let rest = text.strip_prefix("initcall ")?;
    let (func, rest) = rest.split_once(' ')?;
    let us = rest.split_once(" after ")?.1.strip_suffix(" usecs")?;
    let name = func.split('+').next().unwrap_or(func);
    Some((name.to_string(), us.parse().ok()?))
}

/// The kernel's boot read from its console log: where init starts, the initcalls' sum and the
/// slowest of them, and the longest gaps between consecutive lines before init starts (each
/// named by the line that ended it). An error when the log has no timestamps or init never
/// started.
pub fn profile(console: &str) -> Result<Value, String> {
    let lines: Vec<(f64, &str)> = console.lines().filter_map(stamped).collect();
    let init_at = lines
        .iter()
        .find(|(_, text)| text.starts_with(INIT_STARTS))
        .map(|(t, _)| *t)
        .ok_or_else(|| format!("no timestamped `{INIT_STARTS}` line"))?;
    let kernel: Vec<&(f64, &str)> = lines.iter().filter(|(t, _)| *t <= init_at).collect();
    let mut calls: Vec<(String, u64)> = kernel.iter().filter_map(|(_, x)| initcall(x)).collect();
    let total_us: u64 = calls.iter().map(|c| c.1).sum();
    calls.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut gaps: Vec<(f64, f64, &str)> = kernel
        .windows(2)
        .map(|w| ((w[1].0 - w[0].0) * 1000.0, w[1].0, w[1].1))
        .collect();
    gaps.sort_by(|a, b| b.0.total_cmp(&a.0));
    Ok(serde_json::json!({
        "init_starts_ms": init_at * 1000.0,
        "initcalls": calls.len(),
        "initcalls_total_ms": total_us as f64 / 1000.0,
        "slowest_initcalls": calls.iter().take(TOP)
            .map(|(n, us)| serde_json::json!({"name": n, "ms": *us as f64 / 1000.0}))
            .collect::<Vec<_>>(),
        "longest_silences": gaps.iter().take(TOP)
            .map(|(ms, at, before)| serde_json::json!({"ms": ms, "ended_at_ms": at * 1000.0, "before": before}))
            .collect::<Vec<_>>(),
    }))
}

/// The profile as lines for the benchmark's table.
pub fn describe(p: &Value) -> Vec<String> {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mut out = vec![format!(
        "kernel's own log (one boot with {CMDLINE}): init starts at {:.0} ms; {} initcalls take {:.0} ms",
        f(&p["init_starts_ms"]),
        p["initcalls"],
        f(&p["initcalls_total_ms"])
    )];
    for c in p["slowest_initcalls"]
        .as_array()
        .into_iter()
        .flatten()
        .take(5)
    {
        out.push(format!(
            "  initcall {:<40} {:>7.1} ms",
            c["name"].as_str().unwrap_or("?"),
            f(&c["ms"])
        ));
    }
    for g in p["longest_silences"]
        .as_array()
        .into_iter()
        .flatten()
        .take(5)
    {
        let before: String = g["before"]
            .as_str()
            .unwrap_or("?")
            .chars()
            .take(60)
            .collect();
        out.push(format!(
            "  silent {:>7.1} ms before `{before}` (at {:.0} ms)",
            f(&g["ms"]),
            f(&g["ended_at_ms"])
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shortened x86_64 log as the profile boot prints it (TCG, before noapictimer).
    const LOG: &str = "\
[    0.000000] Linux version 6.1.192
[    0.163386] Calibrating delay loop (skipped), value calculated using timer frequency..
[    0.180482] x86/fpu: Enabled xstate features 0x21f
[    0.289020] Freeing SMP alternatives memory: 28K
[    0.539238] smpboot: CPU0: AMD QEMU TCG CPU version 2.5+
[    0.600000] calling  chr_dev_init+0x0/0xa2 @ 1
[    0.614415] initcall chr_dev_init+0x0/0xa2 returned 0 after 14415 usecs
[    0.700000] initcall inet_init+0x0/0x249 returned 0 after 12228 usecs
not a kernel line
[    0.913851] Run /sbin/openshell-init as init process
[    0.950000] initcall late_after_init+0x0/0x10 returned 0 after 99999 usecs
";

    #[test]
    fn initcalls_and_silences_come_from_the_kernels_own_lines() {
        let p = profile(LOG).expect("profile");
        assert_eq!(p["init_starts_ms"], 913.851);
        // Only the kernel's boot counts: the line after init starts is left out.
        assert_eq!(p["initcalls"], 2);
        assert_eq!(p["initcalls_total_ms"], 26.643);
        assert_eq!(p["slowest_initcalls"][0]["name"], "chr_dev_init");
        assert_eq!(p["slowest_initcalls"][0]["ms"], 14.415);
        let gap = &p["longest_silences"][0];
        assert!(
            (gap["ms"].as_f64().expect("ms") - 250.218).abs() < 1e-6,
            "{gap}"
        );
        assert!(gap["before"]
            .as_str()
            .is_some_and(|b| b.starts_with("smpboot: CPU0")));
        let text = describe(&p).join("\n");
        assert!(
            text.contains("chr_dev_init") && text.contains("smpboot"),
            "{text}"
        );
    }

    #[test]
    fn a_log_without_init_starting_is_an_error() {
        let err = profile("[    0.1] Linux version\n").unwrap_err();
        assert!(err.contains(INIT_STARTS), "{err}");
        assert!(profile("no stamps at all\n").is_err());
    }
}
