//! Guest paths under a root: the one rule for where a path the guest names (`/etc/resolv.conf`)
//! lives when the root is not `/` (a phase run against a scratch directory, a test's tempdir).

use std::path::{Path, PathBuf};

/// `guest_path` (absolute, as the guest sees it) under `root`. Joined as is, an absolute path
/// would replace `root` instead of going under it, so its leading slashes are dropped first.
pub fn under(root: &Path, guest_path: &str) -> PathBuf {
    root.join(guest_path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_guest_paths_stay_under_the_root() {
        let root = Path::new("/tmp/r");
        assert_eq!(
            under(root, "/etc/resolv.conf"),
            Path::new("/tmp/r/etc/resolv.conf")
        );
        assert_eq!(under(root, "//run//k3s"), Path::new("/tmp/r/run/k3s"));
        assert_eq!(under(root, "var/lib"), Path::new("/tmp/r/var/lib"));
        assert_eq!(under(root, "/"), root);
        assert_eq!(
            under(Path::new("/"), "/proc/cmdline"),
            Path::new("/proc/cmdline")
        );
    }
}
