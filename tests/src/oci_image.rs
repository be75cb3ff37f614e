//! A container image the tests build themselves, with no registry: one layer holding
//! busybox-static (the base root's, so of the guest's architecture) and the few files a container
//! needs, written as an OCI image layout in a tar archive, which `ctr image import` takes. The
//! name containerd gives it comes from the `io.containerd.image.name` annotation in `index.json`.
//!
//! Deterministic: fixed modes, owners and mtimes, no creation date, so the same busybox gives the
//! same digests. The tar headers are written here (ustar; names stay under 100 bytes).

use sha2::{Digest, Sha256};

pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// The annotation containerd's importer names an image by.
pub const NAME_ANNOTATION: &str = "io.containerd.image.name";

/// Applets linked in the image's /bin: what the tests' containers run.
const APPLETS: &[&str] = &[
    "cat", "dd", "echo", "false", "head", "ls", "mkdir", "rm", "sh", "sleep", "sync", "test",
    "true", "wc",
];

/// One blob of the layout: its bytes and their digest (`sha256:<hex>`).
#[derive(Debug, Clone)]
pub struct Blob {
    pub bytes: Vec<u8>,
    pub digest: String,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        let digest = format!("sha256:{}", sha256_hex(&bytes));
        Self { bytes, digest }
    }

    /// The OCI descriptor of this blob.
    fn descriptor(&self, media_type: &str) -> serde_json::Value {
        serde_json::json!({
            "mediaType": media_type,
            "digest": self.digest,
            "size": self.bytes.len(),
        })
    }
}

/// The image: its blobs and the archive `ctr image import` reads.
#[derive(Debug, Clone)]
pub struct Image {
    pub name: String,
    pub layer: Blob,
    pub config: Blob,
    pub manifest: Blob,
    pub index: Vec<u8>,
    pub archive: Vec<u8>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The OCI architecture name of one of ours (`x86_64`, `aarch64`).
pub fn oci_arch(arch: &str) -> &'static str {
    match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no OCI architecture for {other}"),
    }
}

/// Builds the image named `name` (e.g. `docker.io/openshell/busybox:test`) from the bytes of a
/// busybox-static built for `arch`.
pub fn busybox_image(busybox: &[u8], arch: &str, name: &str) -> Image {
    let layer = Blob::new(busybox_layer(busybox));
    let config = Blob::new(json_bytes(&serde_json::json!({
        "architecture": oci_arch(arch),
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
        "history": [{ "created_by": "openshell-tests oci_image::busybox_image" }],
    })));
    let manifest = Blob::new(json_bytes(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config.descriptor(MEDIA_CONFIG),
        "layers": [layer.descriptor(MEDIA_LAYER)],
    })));
    let mut entry = manifest.descriptor(MEDIA_MANIFEST);
    entry["platform"] = serde_json::json!({ "architecture": oci_arch(arch), "os": "linux" });
    entry["annotations"] = serde_json::json!({ NAME_ANNOTATION: name });
    let index = json_bytes(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [entry],
    }));
    let mut tar = Tar::default();
    tar.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#);
    tar.file("index.json", 0o644, &index);
    tar.dir("blobs", 0o755);
    tar.dir("blobs/sha256", 0o755);
    for blob in [&layer, &config, &manifest] {
        let hex = blob.digest.trim_start_matches("sha256:");
        tar.file(&format!("blobs/sha256/{hex}"), 0o644, &blob.bytes);
    }
    Image {
        name: name.to_string(),
        layer,
        config,
        manifest,
        index,
        archive: tar.finish(),
    }
}

fn json_bytes(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON of a value")
}

/// The layer: /bin/busybox with links for [`APPLETS`], the mount points runc uses, a world
/// writable /tmp and root's passwd and group entries.
fn busybox_layer(busybox: &[u8]) -> Vec<u8> {
    let mut tar = Tar::default();
    tar.dir("bin", 0o755);
    tar.file("bin/busybox", 0o755, busybox);
    for applet in APPLETS {
        tar.symlink(&format!("bin/{applet}"), "busybox");
    }
    for dir in ["dev", "etc", "proc", "sys", "data"] {
        tar.dir(dir, 0o755);
    }
    tar.dir("tmp", 0o1777);
    tar.file("etc/passwd", 0o644, b"root:x:0:0:root:/:/bin/sh\n");
    tar.file("etc/group", 0o644, b"root:x:0:\n");
    tar.finish()
}

/// A ustar archive in memory: entries owned by root, mtime 0.
#[derive(Default)]
pub struct Tar {
    out: Vec<u8>,
}

impl Tar {
    pub fn dir(&mut self, path: &str, mode: u32) {
        self.entry(&format!("{path}/"), mode, b'5', "", &[]);
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, mode, b'0', "", data);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, 0o777, b'2', target, &[]);
    }

    /// The archive, ended by its two zero blocks.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(&[0u8; 1024]);
        self.out
    }

    fn entry(&mut self, name: &str, mode: u32, kind: u8, link: &str, data: &[u8]) {
        assert!(
            name.len() < 100 && link.len() < 100,
            "tar name too long: {name}"
        );
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut h[100..108], mode as u64);
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], 0);
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..269].copy_from_slice(b"root");
        h[297..301].copy_from_slice(b"root");
        // The checksum is the sum of the header's bytes with its own field read as spaces.
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        let field = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(field.as_bytes());
        self.out.extend_from_slice(&h);
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.resize(self.out.len() + pad, 0);
    }
}

/// `value` in octal, zero-padded, NUL-terminated, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let text = format!("{value:0width$o}\0", width = field.len() - 1);
    assert_eq!(text.len(), field.len(), "{value} does not fit a tar field");
    field.copy_from_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const NAME: &str = "docker.io/openshell/busybox:test";

    const FAKE_BUSYBOX: &[u8] = b"\x7fELF not really busybox";

    fn image() -> Image {
        busybox_image(FAKE_BUSYBOX, "x86_64", NAME)
    }

    /// GNU tar's verbose listing of an archive (owner, mode, size, name, link target).
    fn gnu_tar_list(archive: &[u8]) -> String {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("a.tar");
        std::fs::write(&path, archive).expect("write");
        let out = Command::new("tar")
            .args(["--numeric-owner", "-tvf"])
            .arg(&path)
            .output()
            .expect("GNU tar (Debian package tar)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every entry of the layer as GNU tar reads it: modes, owners, sizes, link targets.
    #[test]
    fn gnu_tar_reads_the_layer_as_written() {
        let img = image();
        let list = gnu_tar_list(&img.layer.bytes);
        let lines: Vec<Vec<&str>> = list
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let find = |name: &str| {
            lines
                .iter()
                .find(|l| l[5] == name)
                .unwrap_or_else(|| panic!("{name} not in\n{list}"))
                .clone()
        };
        let busybox = find("bin/busybox");
        assert_eq!(busybox[0], "-rwxr-xr-x");
        assert_eq!(busybox[1], "0/0");
        assert_eq!(busybox[2], FAKE_BUSYBOX.len().to_string());
        let sh = find("bin/sh");
        assert_eq!((sh[0], sh[6], sh[7]), ("lrwxrwxrwx", "->", "busybox"));
        assert_eq!(find("tmp/")[0], "drwxrwxrwt");
        assert_eq!(find("etc/passwd")[0], "-rw-r--r--");
        assert_eq!(lines.len(), 1 + 1 + APPLETS.len() + 6 + 2, "{list}");
    }

    /// The layout as containerd's importer walks it: index -> manifest -> config and layer, each
    /// blob stored under its own digest with the size its descriptor gives, the image named.
    #[test]
    fn the_layout_links_every_blob_by_digest_and_size() {
        let img = image();
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("image.tar");
        std::fs::write(&path, &img.archive).expect("write");
        let st = Command::new("tar")
            .arg("-xf")
            .arg(&path)
            .arg("-C")
            .arg(dir.path())
            .status()
            .expect("tar");
        assert!(st.success());
        let read = |rel: &str| std::fs::read(dir.path().join(rel)).expect(rel);
        let blob = |digest: &serde_json::Value| {
            let digest = digest.as_str().expect("digest string");
            let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
            let bytes = read(&format!("blobs/sha256/{hex}"));
            assert_eq!(sha256_hex(&bytes), hex, "blob stored under its digest");
            bytes
        };
        let layout: serde_json::Value = serde_json::from_slice(&read("oci-layout")).expect("json");
        assert_eq!(layout["imageLayoutVersion"], "1.0.0");
        let index: serde_json::Value = serde_json::from_slice(&read("index.json")).expect("json");
        assert_eq!(index["schemaVersion"], 2);
        let entry = &index["manifests"][0];
        assert_eq!(entry["mediaType"], MEDIA_MANIFEST);
        assert_eq!(entry["annotations"][NAME_ANNOTATION], NAME);
        assert_eq!(entry["platform"]["architecture"], "amd64");
        let manifest_bytes = blob(&entry["digest"]);
        assert_eq!(entry["size"], manifest_bytes.len());
        let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).expect("json");
        assert_eq!(manifest["mediaType"], MEDIA_MANIFEST);
        assert_eq!(manifest["config"]["mediaType"], MEDIA_CONFIG);
        let config_bytes = blob(&manifest["config"]["digest"]);
        assert_eq!(manifest["config"]["size"], config_bytes.len());
        let layer = &manifest["layers"][0];
        assert_eq!(layer["mediaType"], MEDIA_LAYER);
        let layer_bytes = blob(&layer["digest"]);
        assert_eq!(layer["size"], layer_bytes.len());
        let config: serde_json::Value = serde_json::from_slice(&config_bytes).expect("json");
        assert_eq!(
            (&config["os"], &config["architecture"]),
            (&"linux".into(), &"amd64".into())
        );
        // An uncompressed layer: its diff ID is its digest.
        assert_eq!(config["rootfs"]["diff_ids"][0], layer["digest"]);
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(layer_bytes, img.layer.bytes);
    }

    #[test]
    fn the_same_busybox_gives_the_same_digests() {
        let (a, b) = (image(), image());
        assert_eq!(a.manifest.digest, b.manifest.digest);
        assert_eq!(a.archive, b.archive);
        let other = busybox_image(b"another busybox", "x86_64", NAME);
        assert_ne!(other.layer.digest, a.layer.digest);
        assert_ne!(other.manifest.digest, a.manifest.digest);
        let arm = busybox_image(FAKE_BUSYBOX, "aarch64", NAME);
        assert_eq!(arm.layer.digest, a.layer.digest);
        assert_ne!(
            arm.config.digest, a.config.digest,
            "the config names the arch"
        );
    }

    #[test]
    fn header_checksums_and_sizes_follow_ustar() {
        let mut tar = Tar::default();
        tar.file("a", 0o600, &[7u8; 513]);
        let out = tar.finish();
        // One header, two data blocks (513 bytes padded), two end blocks.
        assert_eq!(out.len(), 512 * 5);
        let h = &out[..512];
        assert_eq!(&h[124..136], b"00000001001\0");
        let stored = std::str::from_utf8(&h[148..154]).expect("ascii");
        let mut blank = h.to_vec();
        blank[148..156].copy_from_slice(b"        ");
        let sum: u32 = blank.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(u32::from_str_radix(stored, 8).expect("octal"), sum);
        assert!(out[512 * 3..].iter().all(|&b| b == 0));
    }
}
