//! The format end to end: a small tree with every kind of entry written and unpacked both ways,
//! and every damaged or hostile bundle refused with the member at fault named. Needs root for the
//! device node and the foreign owners (the tests skip, saying so, without it).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::error::BundleError;
use super::install::{install, COMPLETE};
use super::manifest::{hex, Manifest, Member, INIT, KERNEL, MANIFEST, ROOTFS};
use super::owners::{parse_override, Owners, OVERRIDE_STAT};
use super::pack::{write_bundle, write_root, Inputs};
use super::tar::{write_end, write_header, write_padding, Header, Kind};
use super::unpack::open;
use crate::arch::Arch;

fn is_root() -> bool {
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: needs root (device nodes, foreign owners)");
    }
    root
}

/// A root with a directory, a set-uid file owned by someone else with an xattr, a hard link, a
/// symlink, a character device and a fifo.
fn sample_tree(dir: &Path) -> PathBuf {
    let root = dir.join("tree");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(root.join("dev")).unwrap();
    fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
    std::os::unix::fs::chown(root.join("etc/passwd"), Some(1000), Some(1001)).unwrap();
    fs::set_permissions(root.join("etc/passwd"), fs::Permissions::from_mode(0o4751)).unwrap();
    xattr::set(root.join("etc/passwd"), "user.note", b"kept").unwrap();
    fs::hard_link(root.join("etc/passwd"), root.join("etc/passwd.link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("passwd")).unwrap();
    let null = std::ffi::CString::new(root.join("dev/null").into_os_string().into_encoded_bytes())
        .unwrap();
    // SAFETY: a valid path; makedev(1, 3).
    assert_eq!(
        unsafe { libc::mknod(null.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) },
        0
    );
    let fifo =
        std::ffi::CString::new(root.join("fifo").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    root
}

fn write_sample(dir: &Path) -> (PathBuf, Manifest) {
    let root = sample_tree(dir);
    fs::write(dir.join("bzImage"), b"kernel bytes").unwrap();
    fs::write(dir.join("init"), b"init bytes").unwrap();
    let out = dir.join("gw.bundle");
    let inputs = Inputs {
        crate_version: "0.1.0",
        arch: Arch::X86_64,
        profile: "base",
        kernel: &dir.join("bzImage"),
        init: &dir.join("init"),
        rootfs: &root,
        vm: None,
        level: 3,
    };
    let manifest = write_bundle(&inputs, &out).expect("write");
    (out, manifest)
}

fn unpack(bytes: &[u8], owners: Owners) -> Result<tempfile::TempDir, BundleError> {
    let dir = tempfile::tempdir().unwrap();
    open(bytes)?.unpack_into(dir.path(), owners)?;
    Ok(dir)
}

#[test]
fn a_tree_round_trips_with_owners_links_devices_and_xattrs() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (out, manifest) = write_sample(tmp.path());
    assert!(manifest.version.starts_with("0.1.0+"));
    let dir = unpack(&fs::read(&out).unwrap(), Owners::Real).expect("unpack");
    let root = dir.path().join("rootfs");
    assert_eq!(fs::read(dir.path().join(KERNEL)).unwrap(), b"kernel bytes");
    let passwd = fs::symlink_metadata(root.join("etc/passwd")).unwrap();
    assert_eq!(
        (passwd.uid(), passwd.gid(), passwd.mode() & 0o7777),
        (1000, 1001, 0o4751)
    );
    assert_eq!(
        xattr::get(root.join("etc/passwd"), "user.note")
            .unwrap()
            .unwrap(),
        b"kept"
    );
    let link = fs::symlink_metadata(root.join("etc/passwd.link")).unwrap();
    assert_eq!((link.ino(), passwd.nlink()), (passwd.ino(), 2));
    assert_eq!(
        fs::read_link(root.join("passwd")).unwrap(),
        Path::new("/etc/passwd")
    );
    let null = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert!(fs::symlink_metadata(root.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    // The unpacked tree packs to the same bytes: nothing was lost or changed.
    let (mut a, mut b) = (Vec::new(), Vec::new());
    write_root(&tmp.path().join("tree"), &mut a).unwrap();
    write_root(&root, &mut b).unwrap();
    assert!(a == b, "the unpacked tree differs from the original");
}

#[test]
fn without_root_owners_and_devices_go_into_libkrun_s_xattr() {
    if !is_root() {
        return; // the sample tree needs root to make; the unpack below does no chown or mknod
    }
    let tmp = tempfile::tempdir().unwrap();
    let (out, _) = write_sample(tmp.path());
    let dir = unpack(&fs::read(&out).unwrap(), Owners::Xattr).expect("unpack");
    let root = dir.path().join("rootfs");
    let stat = |p: &str| parse_override(&xattr::get(root.join(p), OVERRIDE_STAT).unwrap().unwrap());
    assert_eq!(stat("etc/passwd"), Some((1000, 1001, 0o4751)));
    let orig = fs::symlink_metadata(tmp.path().join("tree/dev/null"))
        .unwrap()
        .mode();
    assert_eq!(stat("dev/null"), Some((0, 0, orig)), "{orig:o}");
    assert_eq!(orig & libc::S_IFMT, libc::S_IFCHR);
    let null = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(
        null.is_file(),
        "a device node is a regular file carrying the xattr"
    );
    // The unpacking user owns everything and can read it; set-id bits stay in the xattr only.
    let passwd = fs::symlink_metadata(root.join("etc/passwd")).unwrap();
    assert_eq!((passwd.uid(), passwd.mode() & 0o7777), (0, 0o751));
    assert_eq!(
        xattr::get(root.join("etc/passwd"), "user.note")
            .unwrap()
            .unwrap(),
        b"kept"
    );
}

/// A bundle made of these members (name, bytes) with a manifest that matches them.
fn bundle_of(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let described: Vec<Member> = members
        .iter()
        .map(|(name, bytes)| Member {
            name: (*name).into(),
            size: bytes.len() as u64,
            sha256: hex(&<sha2::Sha256 as sha2::Digest>::digest(bytes)),
        })
        .collect();
    let manifest = Manifest::new("0.1.0", Arch::Aarch64, "base", described, None);
    let mut tar = Vec::new();
    let json = manifest.to_json();
    append(&mut tar, MANIFEST, &json);
    for (name, bytes) in members {
        append(&mut tar, name, bytes);
    }
    write_end(&mut tar).unwrap();
    zstd::encode_all(&tar[..], 3).unwrap()
}

fn append(tar: &mut Vec<u8>, name: &str, bytes: &[u8]) {
    write_header(tar, &Header::file(name, bytes.len() as u64, 0o644)).unwrap();
    tar.extend_from_slice(bytes);
    write_padding(tar, bytes.len() as u64).unwrap();
}

/// A bundle whose root is these inner entries (header, content).
fn bundle_with_root(entries: &[(Header, &[u8])]) -> Vec<u8> {
    let mut root = Vec::new();
    for (h, body) in entries {
        write_header(&mut root, h).unwrap();
        root.extend_from_slice(body);
        write_padding(&mut root, body.len() as u64).unwrap();
    }
    write_end(&mut root).unwrap();
    bundle_of(&[
        (KERNEL, b"k".to_vec()),
        (INIT, b"i".to_vec()),
        (ROOTFS, root),
    ])
}

fn inner(path: &str, kind: Kind, link: &str, size: u64) -> Header {
    let mut h = Header::file(path, size, 0o644);
    h.kind = kind;
    h.link = link.as_bytes().to_vec();
    h
}

#[test]
fn a_flipped_byte_in_a_member_names_it_with_both_digests() {
    let good = bundle_of(&[
        (KERNEL, b"kernel".to_vec()),
        (INIT, b"init".to_vec()),
        (ROOTFS, bundle_root_empty()),
    ]);
    let mut tar = zstd::decode_all(&good[..]).unwrap();
    let at = header_of(&tar, KERNEL) + 512;
    tar[at] = b'K';
    let bad = zstd::encode_all(&tar[..], 3).unwrap();
    let err = unpack(&bad, Owners::Real).unwrap_err().to_string();
    let expected = hex(&<sha2::Sha256 as sha2::Digest>::digest(b"kernel"));
    let found = hex(&<sha2::Sha256 as sha2::Digest>::digest(b"Kernel"));
    assert!(
        err.contains("member kernel") && err.contains(&expected) && err.contains(&found),
        "{err}"
    );
}

/// Where the header of the outer member `name` starts.
fn header_of(tar: &[u8], name: &str) -> usize {
    let mut key = name.as_bytes().to_vec();
    key.push(0);
    (0..tar.len())
        .step_by(512)
        .find(|at| tar[*at..].starts_with(&key))
        .unwrap()
}

fn bundle_root_empty() -> Vec<u8> {
    let mut root = Vec::new();
    write_header(&mut root, &inner(".", Kind::Dir, "", 0)).unwrap();
    write_end(&mut root).unwrap();
    root
}

#[test]
fn hostile_root_entries_are_refused_by_name() {
    let file = |p: &str| (inner(p, Kind::File, "", 1), &b"x"[..]);
    let dir = |p: &str| (inner(p, Kind::Dir, "", 0), &b""[..]);
    type Case<'a> = (Vec<(Header, &'a [u8])>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![file("../escape")],
            "entry ../escape: a '..' path component",
        ),
        (
            vec![file("/etc/passwd")],
            "entry /etc/passwd: an absolute path",
        ),
        (
            vec![
                (inner("up", Kind::Symlink, "/tmp", 0), &b""[..]),
                file("up/x"),
            ],
            "entry up/x: its parent is not a directory made earlier",
        ),
        (
            vec![dir("a"), file("a/f"), file("a/f")],
            "entry a/f: a second entry of the same name",
        ),
        (
            vec![(inner("hl", Kind::HardLink, "../../etc/shadow", 0), &b""[..])],
            "entry hl: a '..' path component",
        ),
        (
            vec![
                (inner("sym", Kind::Symlink, "/etc/shadow", 0), &b""[..]),
                (inner("hl", Kind::HardLink, "sym", 0), &b""[..]),
            ],
            "entry hl: a hard link to something other than a regular file",
        ),
        (
            vec![file("missing/f")],
            "entry missing/f: its parent is not a directory",
        ),
    ];
    for (entries, expected) in cases {
        let err = unpack(&bundle_with_root(&entries), Owners::Real)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bundle member rootfs.tar") && err.contains(expected),
            "{expected}: {err}"
        );
    }
}

#[test]
fn an_oversize_or_unlisted_member_is_refused_by_name() {
    let good = bundle_of(&[
        (KERNEL, b"kernel".to_vec()),
        (INIT, b"init".to_vec()),
        (ROOTFS, bundle_root_empty()),
    ]);
    let mut tar = zstd::decode_all(&good[..]).unwrap();
    // Grow the kernel's header size by one block's worth: the member no longer matches.
    let at = header_of(&tar, KERNEL);
    let mut h = Header::file(KERNEL, 6 + 512, 0o644);
    h.path = b"kernel".to_vec();
    let mut block = Vec::new();
    write_header(&mut block, &h).unwrap();
    tar[at..at + 512].copy_from_slice(&block);
    let err = unpack(&zstd::encode_all(&tar[..], 3).unwrap(), Owners::Real)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("member kernel: 518 bytes, the manifest says 6"),
        "{err}"
    );

    let mut tar = zstd::decode_all(&good[..]).unwrap();
    tar.truncate(tar.len() - 1024); // drop the end marker
    append(&mut tar, "extra", b"!");
    write_end(&mut tar).unwrap();
    let err = unpack(&zstd::encode_all(&tar[..], 3).unwrap(), Owners::Real)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("member extra: not listed in the manifest"),
        "{err}"
    );

    // An inner entry bigger than what is left of its member.
    let mut root = Vec::new();
    write_header(&mut root, &inner("big", Kind::File, "", 1 << 30)).unwrap();
    let bundle = bundle_of(&[
        (KERNEL, b"k".to_vec()),
        (INIT, b"i".to_vec()),
        (ROOTFS, root),
    ]);
    let err = unpack(&bundle, Owners::Real).unwrap_err().to_string();
    assert!(err.contains("rootfs.tar") && err.contains("big"), "{err}");
}

#[test]
fn a_truncated_bundle_leaves_nothing_that_boots() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (out, manifest) = write_sample(tmp.path());
    let bytes = fs::read(&out).unwrap();
    let bundles = tmp.path().join("bundles");
    for cut in [10, bytes.len() / 3, bytes.len() / 2, bytes.len() - 40] {
        let err = install(&bytes[..cut], &bundles, Owners::Real).unwrap_err();
        assert!(err.to_string().contains("bundle"), "cut at {cut}: {err}");
        let left: Vec<_> = fs::read_dir(&bundles).unwrap().collect();
        assert!(left.is_empty(), "cut at {cut}: {left:?} left behind");
    }
    // A killed unpack's leftovers: a partial directory and a version without its marker.
    fs::create_dir_all(
        bundles
            .join(format!(".partial-{}", manifest.version))
            .join("rootfs"),
    )
    .unwrap();
    fs::create_dir_all(bundles.join(&manifest.version).join("rootfs")).unwrap();
    let installed = install(&bytes[..], &bundles, Owners::Real).expect("install");
    assert!(
        !installed.reused,
        "a version without its marker is unpacked again"
    );
    assert!(
        installed.dir.join(COMPLETE).is_file() && installed.rootfs().join("etc/passwd").is_file()
    );
    let names: Vec<_> = fs::read_dir(&bundles)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from(&manifest.version)]);
}

#[test]
fn a_second_install_reuses_the_copy_unless_its_kernel_changed() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (out, _) = write_sample(tmp.path());
    let bytes = fs::read(&out).unwrap();
    let bundles = tmp.path().join("bundles");
    let first = install(&bytes[..], &bundles, Owners::Real).expect("first");
    assert!(!first.reused);
    fs::write(first.rootfs().join("guest-wrote-this"), b"state").unwrap();
    let second = install(&bytes[..], &bundles, Owners::Real).expect("second");
    assert!(second.reused && second.rootfs().join("guest-wrote-this").is_file());
    fs::write(second.kernel(), b"tampered").unwrap();
    let third = install(&bytes[..], &bundles, Owners::Real).expect("third");
    assert!(!third.reused);
    assert_eq!(fs::read(third.kernel()).unwrap(), b"kernel bytes");
}

/// Set in the child of `a_plain_user_unpacks_without_privileges`: `<bundle>\n<bundles dir>`.
const CHILD_VAR: &str = "OPENSHELL_BUNDLE_TEST_AS_USER";
/// nobody.
const PLAIN_UID: u32 = 65534;

/// The whole install run by a real unprivileged process (this test binary again, as nobody):
/// nothing needs chown, mknod or a privileged xattr, and what it wrote is libkrun's xattr.
#[test]
fn a_plain_user_unpacks_without_privileges() {
    if let Some(args) = std::env::var_os(CHILD_VAR) {
        let args = args.into_string().expect("utf8");
        let (bundle, bundles) = args.split_once('\n').expect("two paths");
        assert_eq!(Owners::for_this_process(), Owners::Xattr);
        let installed = install(
            fs::File::open(bundle).expect("open the bundle"),
            Path::new(bundles),
            Owners::Xattr,
        )
        .expect("install as a plain user");
        assert!(installed.skipped_xattrs == 0 && !installed.reused);
        return;
    }
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (out, manifest) = write_sample(tmp.path());
    fs::set_permissions(&out, fs::Permissions::from_mode(0o644)).unwrap();
    let home = tmp.path().join("home");
    fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(PLAIN_UID), Some(PLAIN_UID)).unwrap();
    let bundles = home.join("bundles");
    let status = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "bundle::tests::a_plain_user_unpacks_without_privileges",
            ])
            .env(
                CHILD_VAR,
                format!("{}\n{}", out.display(), bundles.display()),
            )
            .uid(PLAIN_UID)
            .gid(PLAIN_UID)
            .status()
            .unwrap()
    };
    assert!(status.success(), "the unprivileged install failed");
    let root = bundles.join(&manifest.version).join("rootfs");
    let stat = |p: &str| parse_override(&xattr::get(root.join(p), OVERRIDE_STAT).unwrap().unwrap());
    assert_eq!(stat("etc/passwd"), Some((1000, 1001, 0o4751)));
    assert_eq!(
        stat("dev/null").map(|s| s.2 & libc::S_IFMT),
        Some(libc::S_IFCHR)
    );
    assert_eq!(
        stat("fifo").map(|s| s.2 & libc::S_IFMT),
        Some(libc::S_IFIFO)
    );
    let passwd = fs::symlink_metadata(root.join("etc/passwd")).unwrap();
    assert_eq!((passwd.uid(), passwd.mode() & 0o7777), (PLAIN_UID, 0o751));
    assert!(fs::symlink_metadata(root.join("dev/null"))
        .unwrap()
        .is_file());
}
