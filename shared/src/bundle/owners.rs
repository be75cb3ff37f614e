//! Owners, modes and device nodes of an unpacked root when the unpacking user cannot chown or
//! mknod (a Mac user unpacks as themselves): libkrun's virtio-fs on macOS shows the guest the
//! owner, group and mode it reads from the xattr `user.containers.override_stat`, in the text
//! form `UID:GID:0MODE` (MODE octal). A MODE with file-type bits replaces the whole `st_mode`,
//! which is how libkrun's own mknod keeps a device node: a regular file whose xattr says
//! `S_IFCHR|perm`. libkrun keeps no device number there (its mknod drops `rdev`), so such a node
//! reaches the guest as device 0:0; the guest mounts devtmpfs over /dev before it opens any.

/// The xattr libkrun (macOS) reads.
pub const OVERRIDE_STAT: &str = "user.containers.override_stat";

/// How an unpack records who owns what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owners {
    /// chown, mknod and every xattr, as the archive says (root only).
    Real,
    /// Files owned by the unpacking user; owner, group, mode and device nodes in
    /// [`OVERRIDE_STAT`]; only `user.*` xattrs restored.
    Xattr,
}

impl Owners {
    /// `Real` for root, `Xattr` for anyone else.
    pub fn for_this_process() -> Owners {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            Owners::Real
        } else {
            Owners::Xattr
        }
    }
}

/// The xattr's value: `st_mode` is the full mode for a device node (type bits included), the
/// permission bits (`0o7777`) for anything else.
pub fn override_value(uid: u32, gid: u32, st_mode: u32) -> String {
    format!("{uid}:{gid}:0{st_mode:o}")
}

/// Reads a value back as libkrun does: decimal uid, decimal gid, octal mode.
pub fn parse_override(value: &[u8]) -> Option<(u32, u32, u32)> {
    let text = std::str::from_utf8(value).ok()?;
    let mut parts = text.split(':');
    let uid = parts.next()?.parse().ok()?;
    let gid = parts.next()?.parse().ok()?;
    let mode = u32::from_str_radix(parts.next()?, 8).ok()?;
    parts.next().is_none().then_some((uid, gid, mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_back_as_libkrun_parses_them() {
        let v = override_value(0, 5, 0o020620);
        assert_eq!(v, "0:5:020620");
        assert_eq!(parse_override(v.as_bytes()), Some((0, 5, 0o020620)));
        assert_eq!(parse_override(b"1:2:0755"), Some((1, 2, 0o755)));
        assert_eq!(parse_override(b"1:2"), None);
        assert_eq!(parse_override(b"x:2:0755"), None);
    }
}
