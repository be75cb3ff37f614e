//! The phase in process on real loop devices, in a private mount namespace, where what it leaves
//! mounted can be looked at and used: the binds and what goes through them, the phases after it
//! on the disk (kine's free-space guard, the overlay check), and the unmounting at power-off.
//! Run as root; elsewhere they say so and pass. (The command-level cases, refusals among them,
//! are in `tests/state_disk.rs`.)

use std::path::{Path, PathBuf};

use openshell_init::guest_path::under;

use super::loop_disk::{Image, LoopDisk};
use super::*;
use crate::mountinfo::in_private_mount_ns;

const MIB: u64 = 1 << 20;

/// One of these tests at a time. Each runs mke2fs and opens its disk exclusively, and a child
/// forked while another test holds its disk keeps a copy of that descriptor until it execs:
/// under qemu-user long enough that the other test's mount or mke2fs fails with EBUSY ("is
/// apparently in use by the system"), seen twice in clean-clone runs.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A gateway-shaped root with a database and a certificate to seed, and the disk's node.
fn root_for(disk: &LoopDisk) -> (tempfile::TempDir, String) {
    let root = tempfile::tempdir().expect("root");
    let r = root.path();
    std::fs::create_dir_all(under(r, "/var/lib/rancher/k3s/server/db")).expect("mkdir");
    std::fs::write(under(r, crate::k3s::paths::KINE_DB), b"prebaked db").expect("db");
    std::fs::create_dir_all(under(r, "/opt/openshell/pki")).expect("mkdir");
    std::fs::write(under(r, "/opt/openshell/pki/ca.crt"), b"ca").expect("ca");
    let node = disk.node_in(r);
    (root, node)
}

fn ctx_for(root: &Path, node: &str) -> Ctx {
    let ctx = Ctx::for_test(root);
    let mut cfg = openshell_shared::BootConfig::default();
    cfg.state_disk.device = Some(node.to_string());
    let _ = ctx.config.set(cfg);
    ctx
}

fn detail(r: PhaseResult) -> String {
    match r {
        Ok(Done::Ok(Some(d))) => d,
        other => panic!("{other:?}"),
    }
}

/// Everything under `root` mounted now, as (guest path, source).
fn mounted_under(root: &Path) -> Vec<(String, String)> {
    crate::mountinfo::read()
        .expect("mountinfo")
        .into_iter()
        .filter_map(|e| {
            let p = PathBuf::from(&e.mount_point);
            let rel = p.strip_prefix(root).ok()?;
            Some((format!("/{}", rel.display()), e.source))
        })
        .collect()
}

/// First boot: formatted, seeded, bound; the root's files are seen and written through the
/// binds onto the disk, the root's own copies untouched underneath. Power-off unmounts it all
/// and leaves the filesystem clean. Second boot: the data written is there, nothing seeded.
#[test]
fn binds_carry_the_seed_and_writes_and_power_off_leaves_it_clean() {
    let _one = one_at_a_time();
    let Some(disk) = Image::new(128 * MIB).attach() else {
        return;
    };
    let (root, node) = root_for(&disk);
    let r = root.path().to_path_buf();
    let n = node.clone();
    let first = in_private_mount_ns(move || {
        let ctx = ctx_for(&r, &n);
        let line = detail((PHASE.run)(&ctx));
        let mounts = mounted_under(&r);
        let seen = std::fs::read(under(&r, crate::k3s::paths::KINE_DB)).expect("through bind");
        std::fs::write(under(&r, "/var/lib/rancher/k3s/storage/pvc"), b"user data").expect("write");
        let on_disk = std::fs::read(under(&r, MOUNT_POINT).join("state/local-path-storage/pvc"));
        let in_use = ctx.state_disk.get().cloned();
        let torn = crate::teardown::unmount_all(&r, &[]);
        (
            line,
            mounts,
            seen,
            on_disk.ok(),
            in_use,
            torn,
            mounted_under(&r),
        )
    });
    let Some((line, mounts, seen, on_disk, in_use, torn, after)) = first else {
        return;
    };
    assert!(
        line.contains("formatted in ") && line.contains("; seeded "),
        "{line}"
    );
    assert!(
        line.contains(&format!("; {} binds in ", BINDS.len())),
        "{line}"
    );
    // mount(2) was given the node under the root: the table shows that path.
    let source = under(root.path(), &node).display().to_string();
    assert!(
        mounts.contains(&(MOUNT_POINT.to_string(), source.clone())),
        "{mounts:?}"
    );
    for b in BINDS {
        assert!(
            mounts.contains(&(b.target.to_string(), source.clone())),
            "{} not bound from {source}: {mounts:?}",
            b.target
        );
    }
    assert_eq!(seen, b"prebaked db");
    assert_eq!(on_disk.as_deref(), Some(&b"user data"[..]));
    let in_use = in_use.expect("recorded for the phases after");
    assert_eq!(in_use.device, node);
    assert!(in_use.holds(crate::k3s::paths::KINE_DB));
    assert_eq!(torn.unmounted, BINDS.len() + 1);
    assert!(torn.busy.is_empty(), "{torn:?}");
    assert!(after.is_empty(), "{after:?}");
    // The root underneath was neither written nor hidden for good.
    assert!(!under(root.path(), "/var/lib/rancher/k3s/storage/pvc").exists());
    assert_eq!(
        std::fs::read(under(root.path(), crate::k3s::paths::KINE_DB)).expect("root copy"),
        b"prebaked db"
    );
    let sb = disk.dumpe2fs();
    assert_eq!(sb["Filesystem state"], "clean");
    assert!(
        !sb["Filesystem features"].contains("needs_recovery"),
        "{sb:?}"
    );

    let r = root.path().to_path_buf();
    let second = in_private_mount_ns(move || {
        let ctx = ctx_for(&r, &node);
        let line = detail((PHASE.run)(&ctx));
        let kept = std::fs::read(under(&r, "/var/lib/rancher/k3s/storage/pvc")).ok();
        crate::teardown::unmount_all(&r, &[]);
        (line, kept)
    })
    .expect("namespace");
    assert!(
        second.0.contains("seeded on an earlier boot") && !second.0.contains("formatted"),
        "{}",
        second.0
    );
    assert_eq!(second.1.as_deref(), Some(&b"user data"[..]));
}

/// A full disk: kine's free-space guard refuses, names the state disk, and the database is
/// left as it was.
#[test]
fn kine_on_a_full_state_disk_names_it() {
    let _one = one_at_a_time();
    let Some(disk) = Image::new(128 * MIB).attach() else {
        return;
    };
    let (root, node) = root_for(&disk);
    let r = root.path().to_path_buf();
    let n = node.clone();
    let result = in_private_mount_ns(move || {
        let ctx = ctx_for(&r, &n);
        detail((PHASE.run)(&ctx));
        let db = under(&r, crate::k3s::paths::KINE_DB);
        // A real (if empty) SQLite database, so only the space stops kine.
        std::fs::remove_file(&db).expect("rm");
        rusqlite::Connection::open(&db)
            .and_then(|c| c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);"))
            .expect("sqlite");
        let before = std::fs::read(&db).expect("read");
        let fill = under(&r, "/var/lib/rancher/k3s/storage/fill");
        let (_, free) = seed::space(&under(&r, "/var/lib/rancher/k3s/storage")).expect("statvfs");
        let f = std::fs::File::create(&fill).expect("create");
        nix::fcntl::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            nix::fcntl::FallocateFlags::empty(),
            0,
            (free - 8 * MIB) as i64,
        )
        .expect("fallocate");
        let err = (crate::phases::kine::PHASE.run)(&ctx)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        let after = std::fs::read(&db).expect("read");
        crate::teardown::unmount_all(&r, &[]);
        (err, before == after)
    });
    let Some((err, unchanged)) = result else {
        return;
    };
    assert!(
        err.contains(&format!(
            " MiB free on the state disk {node}, 64 MiB needed"
        )),
        "{err}"
    );
    assert!(unchanged, "kine touched the database");
}

/// The capabilities phase's overlay check on the disk, as containerd will use it: works on
/// our ext4; fails, naming d_type, on an ext4 made without it.
#[test]
fn overlay_upper_on_the_disk_works_and_not_without_d_type() {
    let _one = one_at_a_time();
    let Some(disk) = Image::new(128 * MIB).attach() else {
        return;
    };
    let (root, node) = root_for(&disk);
    let img = Image::new(64 * MIB);
    img.run("mke2fs", &["-q", "-F", "-t", "ext4", "-O", "^filetype"]);
    let Some(plain) = img.attach() else { return };
    let plain_dev = plain.dev.clone();
    let r = root.path().to_path_buf();
    let result = in_private_mount_ns(move || {
        let ctx = ctx_for(&r, &node);
        detail((PHASE.run)(&ctx));
        let snapshots = under(&r, crate::k3s::paths::CONTAINERD_ROOT)
            .join(crate::k3s::paths::CONTAINERD_OVERLAYFS);
        let on_disk = crate::phases::capabilities::overlay::check(&snapshots);
        let fs = crate::phases::capabilities::overlay::fs_name(&snapshots);
        crate::teardown::unmount_all(&r, &[]);
        let at = r.join("plain");
        std::fs::create_dir_all(&at).expect("mkdir");
        nix::mount::mount(
            Some(&plain_dev),
            &at,
            Some("ext4"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount");
        let without = crate::phases::capabilities::overlay::check(&at.join("snap"));
        let _ = nix::mount::umount2(&at, nix::mount::MntFlags::empty());
        (on_disk, fs, without)
    });
    let Some((on_disk, fs, without)) = result else {
        return;
    };
    assert_eq!(on_disk, Ok(()));
    assert_eq!(fs, "ext4");
    let e = without.unwrap_err();
    assert!(e.contains("(d_type)"), "{e}");
}

/// A link planted on the disk where a bound directory belongs is not bound through.
#[test]
fn a_link_on_the_disk_is_not_bound_through() {
    let _one = one_at_a_time();
    let Some(disk) = Image::new(128 * MIB).attach() else {
        return;
    };
    let (root, node) = root_for(&disk);
    let r = root.path().to_path_buf();
    let result = in_private_mount_ns(move || {
        detail((PHASE.run)(&ctx_for(&r, &node)));
        let pki = under(&r, MOUNT_POINT).join("state/pki");
        crate::teardown::unmount_all(&r, &[]);
        // The disk alone, mounted again, gets the link.
        let mp = under(&r, MOUNT_POINT);
        nix::mount::mount(
            Some(&under(&r, &node)),
            &mp,
            Some("ext4"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount");
        crate::remove::remove_tree(&pki).expect("rm");
        std::os::unix::fs::symlink("/etc", &pki).expect("link");
        // EBUSY for a moment was seen here under qemu-user, most likely a child another test
        // thread forked, holding copies of our descriptors until it execs; waited out as the
        // phase's own mount does.
        device::waiting_out_busy(
            || nix::mount::umount2(&mp, nix::mount::MntFlags::empty()),
            |e| *e == Errno::EBUSY,
        )
        .expect("umount");
        let err = (PHASE.run)(&ctx_for(&r, &node))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        let bound_etc = mounted_under(&r)
            .iter()
            .any(|(p, _)| p == "/opt/openshell/pki");
        crate::teardown::unmount_all(&r, &[]);
        (err, bound_etc)
    });
    let Some((err, bound_etc)) = result else {
        return;
    };
    assert_eq!(
        err,
        "state/pki on the state disk is not a directory (a link?): not binding it"
    );
    assert!(!bound_etc);
}

/// A mount point that something is mounted on already (a tmpfs here, as a second run of the
/// phase would find the disk) is refused by name, and nothing is mounted over it.
#[test]
fn a_mount_point_in_use_is_refused() {
    let _one = one_at_a_time();
    let Some(disk) = Image::new(128 * MIB).attach() else {
        return;
    };
    let (root, node) = root_for(&disk);
    let r = root.path().to_path_buf();
    let seen = in_private_mount_ns(move || {
        let mp = under(&r, MOUNT_POINT);
        std::fs::create_dir_all(&mp).expect("mkdir");
        nix::mount::mount(
            Some("tmpfs"),
            &mp,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("tmpfs");
        let err = (PHASE.run)(&ctx_for(&r, &node)).expect_err("refused");
        (err.to_string(), mounted_under(&r))
    });
    if let Some((err, mounts)) = seen {
        assert!(
            err.ends_with("something is already mounted on /run/openshell/state-disk"),
            "{err}"
        );
        assert_eq!(mounts, vec![(MOUNT_POINT.to_string(), "tmpfs".to_string())]);
    }
}
