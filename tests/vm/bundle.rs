//! Booting from a bundle (`cargo xtask bundle`, base profile) on both arches under qemu TCG:
//! the host checks and unpacks it into the instance's state directory, the guest runs its exec
//! workload to the end, and a second `up` boots the same unpacked copy (what the first guest
//! wrote is still there) without unpacking again. A host with no `--bundle`, `--kernel` or
//! `--rootfs` boots the bundle lying next to its binary.

use std::path::Path;
use std::process::{Command, Stdio};

use openshell_tests::{artifacts, both_arches, bundle, host_bin, vm_slot, Boot, BOOT_DEADLINE};

fn boots_from_a_bundle_and_reuses_it(arch: &str) {
    let Some(file) = bundle(arch) else { return };
    let Some(boot) = Boot::from_bundle(arch, &file) else {
        return;
    };
    let _slot = vm_slot();
    let first = boot
        .exec(&[
            "/bin/sh",
            "-c",
            "echo from-the-bundle > /bundle-mark; exit 7",
        ])
        .start()
        .wait(BOOT_DEADLINE);
    let text = first.output();
    assert_eq!(first.status.code(), Some(7), "{text}");
    assert_eq!(first.exit_message().0, 7, "{text}");
    assert!(text.contains("checked and unpacked"), "{text}");
    let bundles = first.boot.instance_dir("default").join("bundles");
    let versions: Vec<_> = std::fs::read_dir(&bundles)
        .unwrap_or_else(|e| panic!("{}: {e}\n{text}", bundles.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(
        versions.len(),
        1,
        "one unpacked version, no partial left: {versions:?}"
    );
    let dir = &versions[0];
    assert!(dir.join("COMPLETE").is_file(), "{}", dir.display());
    let mark = dir.join("rootfs/bundle-mark");
    let written = std::fs::read_to_string(&mark).unwrap_or_default();
    assert_eq!(written, "from-the-bundle\n", "{}", mark.display());

    // The same instance again: the unpacked copy is reused, with what the guest wrote.
    let mut again = first.boot;
    again.exec = ["/bin/sh", "-c", "test -f /bundle-mark"]
        .map(String::from)
        .to_vec();
    let second = again.start().wait(BOOT_DEADLINE);
    let text = second.output();
    assert!(second.status.success(), "{text}");
    assert!(text.contains("reused the copy unpacked in"), "{text}");
    assert!(
        text.contains(&dir.display().to_string()),
        "not {}: {text}",
        Path::new(dir).display()
    );
}

both_arches!(boots_from_a_bundle_and_reuses_it);

fn boots_the_bundle_next_to_the_host(arch: &str) {
    let Some(file) = bundle(arch) else { return };
    let Some(a) = artifacts(arch) else { return };
    let _slot = vm_slot();
    // Short path: unix socket paths in the run directory must stay under 104 bytes.
    let dir = tempfile::Builder::new()
        .prefix("osh-")
        .tempdir_in("/tmp")
        .expect("tmp");
    let host = dir.path().join("openshell-host");
    std::fs::copy(host_bin(), &host).expect("copy the host");
    let sibling = dir.path().join(format!("openshell-gateway-{arch}.bundle"));
    std::fs::copy(&file, &sibling).expect("copy the bundle");
    let out = Command::new(&host)
        .args(["up", "--arch", arch, "--no-state-disk", "--net", "none"])
        .arg("--vsock-helper")
        .arg(&a.vsock_helper)
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .args(["--exec", "/bin/sh", "-c", "exit 5"])
        .env("XDG_STATE_HOME", dir.path().join("state"))
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .env("HOME", dir.path().join("home"))
        .stdin(Stdio::null())
        .output()
        .expect("run openshell-host");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{text}");
    assert!(
        text.contains(&format!(
            "from {}): checked and unpacked",
            sibling.display()
        )),
        "{text}"
    );
}

both_arches!(boots_the_bundle_next_to_the_host);
