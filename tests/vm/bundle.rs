//! Booting from a bundle (`cargo xtask bundle`, base profile) on both arches under qemu TCG:
//! the host checks and unpacks it into the instance's state directory, the guest runs its exec
//! workload to the end, and a second `up` boots the same unpacked copy (what the first guest
//! wrote is still there) without unpacking again.

use std::path::Path;

use openshell_tests::{both_arches, bundle, vm_slot, Boot, BOOT_DEADLINE};

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
