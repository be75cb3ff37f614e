//! What the bytes at the start of a disk say it holds: our ext4 filesystem, another filesystem,
//! a partition table, unknown data, or nothing at all. Pure functions over bytes read from the
//! device, so every rule is tested on its own and arbitrary input is safe to hand them.
//!
//! "Nothing at all" is decided on zeros alone: a disk is blank only when every region it is
//! checked in ([`blank_regions`]) reads back as zeros. Signatures only name what was found.

/// The label `mke2fs -L` gives the state disk's filesystem; with the ext magic, what makes an
/// ext4 filesystem ours.
pub const LABEL: &str = "openshell-state";
/// Enough of the disk to recognise ours: the boot sector, the GPT header and the superblock.
pub const HEAD_LEN: usize = 4096;
/// The size of the regions a blank disk must have zeros in (its first and last MiB).
pub const BLANK_SPAN: u64 = 1 << 20;

/// The disk's last MiB is never the filesystem's (mke2fs and resize2fs are given a size short of
/// it): the format intent ([`intent`]) lives in its last 4 KiB, where nothing else writes.
pub const TAIL_RESERVED: u64 = 1 << 20;
/// The block size the state disk is formatted with.
pub const BLOCK: u64 = 4096;
/// The length of the format intent record.
pub const INTENT_LEN: usize = 4096;
const INTENT_MAGIC: &[u8] = b"openshell-state: formatting a blank disk\n";

/// The filesystem's size in [`BLOCK`]s on a disk of `size` bytes: all of it but the reserved tail.
pub fn fs_blocks(size: u64) -> u64 {
    size.saturating_sub(TAIL_RESERVED) / BLOCK
}

/// Where the format intent of a disk of `size` bytes lives: its last 4 KiB.
pub fn intent_offset(size: u64) -> u64 {
    size.saturating_sub(INTENT_LEN as u64)
}

/// The format intent: written (and synced) to a disk proved blank before mke2fs starts, and
/// cleared once the filesystem is whole, before it is ever mounted. mke2fs writes the primary
/// superblock last, so a format cut short leaves metadata but no superblock; the intent is what
/// says those bytes are ours to format over, and nothing else ever does. It carries the disk's
/// size, so a record from before the disk was grown (at another offset) is not taken.
pub fn intent(size: u64) -> Vec<u8> {
    let mut b = vec![0u8; INTENT_LEN];
    b[..INTENT_MAGIC.len()].copy_from_slice(INTENT_MAGIC);
    let at = INTENT_MAGIC.len();
    b[at..at + 8].copy_from_slice(&size.to_le_bytes());
    b
}

/// Whether `b` (a disk's last 4 KiB) is exactly the format intent for a disk of `size` bytes.
pub fn is_intent(b: &[u8], size: u64) -> bool {
    b == intent(size).as_slice()
}

const SUPERBLOCK: usize = 1024;
const EXT_MAGIC: u16 = 0xEF53;
const COMPAT_HAS_JOURNAL: u32 = 0x4;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_FLEX_BG: u32 = 0x200;
/// s_state: cleanly unmounted; errors detected.
const STATE_VALID: u16 = 0x1;
const STATE_ERROR: u16 = 0x2;

/// The fields of an ext2/3/4 superblock the state disk acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext {
    /// `ext4`, `ext3` or `ext2`, from the features.
    pub kind: &'static str,
    pub label: String,
    pub block_size: u64,
    pub blocks: u64,
    pub free_blocks: u64,
    /// Unmounted cleanly (s_state has EXT2_VALID_FS).
    pub clean: bool,
    /// The kernel recorded an error (EXT2_ERROR_FS) ...
    pub error_flag: bool,
    /// ... or counted some (s_error_count).
    pub error_count: u32,
    /// The journal holds transactions the next mount replays (INCOMPAT_RECOVER).
    pub needs_recovery: bool,
}

impl Ext {
    /// The filesystem's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(self.block_size)
    }

    /// ext4 says it found errors: e2fsck's business before the mount.
    pub fn has_errors(&self) -> bool {
        self.error_flag || self.error_count > 0
    }

    pub fn describe(&self) -> String {
        if self.label.is_empty() {
            format!("an {} filesystem with no label", self.kind)
        } else {
            format!("an {} filesystem labelled `{}`", self.kind, self.label)
        }
    }
}

/// What a disk's first bytes hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Our filesystem, and nothing that contradicts it.
    Ours(Ext),
    /// Every byte given is zero.
    Zero,
    /// Anything else, described for the error ("an MBR partition table (2 partitions)").
    Foreign(String),
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn has(b: &[u8], at: usize, magic: &[u8]) -> bool {
    b.get(at..at + magic.len()) == Some(magic)
}

/// The ext superblock at byte 1024, if the magic is there. `Err` describes a superblock that
/// has the magic but cannot be right (a block size ext4 does not have, no blocks).
pub fn parse_ext(b: &[u8]) -> Option<Result<Ext, String>> {
    parse_superblock(b.get(SUPERBLOCK..SUPERBLOCK + 1024)?)
}

/// An ext superblock at the start of `sb` (a backup's place), if the magic is there.
pub fn parse_superblock(sb: &[u8]) -> Option<Result<Ext, String>> {
    if u16_at(sb, 0x38)? != EXT_MAGIC {
        return None;
    }
    let log = u32_at(sb, 0x18)?;
    let (compat, incompat) = (u32_at(sb, 0x5C)?, u32_at(sb, 0x60)?);
    let hi = |at| {
        if incompat & INCOMPAT_64BIT != 0 {
            u64::from(u32_at(sb, at).unwrap_or(0)) << 32
        } else {
            0
        }
    };
    let blocks = u64::from(u32_at(sb, 0x04)?) | hi(0x150);
    if log > 6 || blocks == 0 {
        return Some(Err(format!(
            "an ext superblock that cannot be right (block size 2^{} KiB, {blocks} blocks)",
            log
        )));
    }
    let state = u16_at(sb, 0x3A)?;
    let label = sb[0x78..0x88]
        .split(|&c| c == 0)
        .next()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .unwrap_or_default();
    let kind = if incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG) != 0 {
        "ext4"
    } else if compat & COMPAT_HAS_JOURNAL != 0 {
        "ext3"
    } else {
        "ext2"
    };
    Some(Ok(Ext {
        kind,
        label,
        block_size: 1024u64 << log,
        blocks,
        free_blocks: u64::from(u32_at(sb, 0x0C)?) | hi(0x158),
        clean: state & STATE_VALID != 0,
        error_flag: state & STATE_ERROR != 0,
        error_count: u32_at(sb, 0x194)?,
        needs_recovery: incompat & INCOMPAT_RECOVER != 0,
    }))
}

/// A partition table at the start of `b`, described.
fn partition_table(b: &[u8]) -> Option<String> {
    if has(b, 512, b"EFI PART") || has(b, 4096, b"EFI PART") {
        return Some("a GPT partition table".into());
    }
    if !has(b, 510, &[0x55, 0xAA]) || boot_sector_fs(b).is_some() {
        return None;
    }
    let types: Vec<u8> = (0..4)
        .filter_map(|i| b.get(446 + 16 * i + 4).copied())
        .collect();
    if types.contains(&0xEE) {
        return Some("a GPT partition table (protective MBR)".into());
    }
    let used = types.iter().filter(|&&t| t != 0).count();
    let s = if used == 1 { "" } else { "s" };
    Some(format!("an MBR partition table ({used} partition{s})"))
}

/// A filesystem whose boot sector carries the 0x55AA signature an MBR also has.
fn boot_sector_fs(b: &[u8]) -> Option<&'static str> {
    if has(b, 3, b"NTFS    ") {
        Some("an NTFS filesystem")
    } else if has(b, 3, b"EXFAT   ") {
        Some("an exFAT filesystem")
    } else if has(b, 82, b"FAT32   ") || has(b, 54, b"FAT1") || has(b, 54, b"FAT ") {
        Some("a FAT filesystem")
    } else {
        None
    }
}

/// Other filesystems and volume formats, by their magic.
fn other_signature(b: &[u8]) -> Option<&'static str> {
    const SIGNATURES: &[(usize, &[u8], &str)] = &[
        (0, b"XFSB", "an XFS filesystem"),
        (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
        (0, b"hsqs", "a squashfs filesystem"),
        (1024, &[0x10, 0x20, 0xF5, 0xF2], "an F2FS filesystem"),
        (4086, b"SWAPSPACE2", "a swap area"),
        (4086, b"SWAP-SPACE", "a swap area"),
        (32769, b"CD001", "an ISO 9660 filesystem"),
        (65536 + 64, b"_BHRfS_M", "a btrfs filesystem"),
    ];
    if (0..4).any(|s| has(b, s * 512, b"LABELONE")) {
        return Some("an LVM physical volume");
    }
    if has(b, 510, &[0x55, 0xAA]) {
        if let Some(fs) = boot_sector_fs(b) {
            return Some(fs);
        }
    }
    SIGNATURES
        .iter()
        .find(|(at, magic, _)| has(b, *at, magic))
        .map(|(_, _, what)| *what)
}

/// What `b`, the first bytes of a disk, holds. Only all zeros is [`Content::Zero`]; our
/// filesystem must carry our label and nothing that contradicts it.
pub fn identify(b: &[u8]) -> Content {
    let table = partition_table(b);
    let ext = parse_ext(b);
    match (table, ext) {
        (Some(t), Some(Ok(e))) => Content::Foreign(format!("{t} and {}", e.describe())),
        (Some(t), _) => Content::Foreign(t),
        (None, Some(Ok(e))) if e.label == LABEL => Content::Ours(e),
        (None, Some(Ok(e))) => Content::Foreign(e.describe()),
        (None, Some(Err(bad))) => Content::Foreign(bad),
        (None, None) => match other_signature(b) {
            Some(what) => Content::Foreign(what.to_string()),
            None => match first_nonzero(b) {
                None => Content::Zero,
                Some(at) => {
                    Content::Foreign(format!("unknown data (first non-zero byte at offset {at})"))
                }
            },
        },
    }
}

/// The offset of the first byte that is not zero.
pub fn first_nonzero(b: &[u8]) -> Option<usize> {
    b.iter().position(|&x| x != 0)
}

/// Where a disk of `size` bytes must read back as zeros to count as blank, as (offset, length):
/// its first MiB (boot sector, partition tables, every superblock near the start), its last MiB
/// (a GPT's backup header, the metadata some volume formats keep at the end), and where ext4
/// keeps its first backup superblock for each block size (a disk whose first MiB was wiped
/// still holds a filesystem e2fsck can recover from there).
pub fn blank_regions(size: u64) -> Vec<(u64, u64)> {
    let mut regions = vec![(0, size.min(BLANK_SPAN))];
    if size > BLANK_SPAN {
        let start = size.saturating_sub(BLANK_SPAN).max(BLANK_SPAN);
        regions.push((start, size - start));
    }
    // Group 1's superblock: block 8193 at 1 KiB blocks (block 0 is the boot block), else the
    // first block of the group (blocks per group = 8 x block size).
    for backup in [8193 * 1024, 16384 * 2048, 32768 * 4096] {
        if backup + 1024 <= size && !regions.iter().any(|&(o, l)| backup >= o && backup < o + l) {
            regions.push((backup, 1024));
        }
    }
    regions
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_intent_is_recognised_only_exactly_and_for_its_disk_size() {
        let size = 256 << 20;
        assert!(is_intent(&intent(size), size));
        assert!(
            !is_intent(&intent(size), size + 4096),
            "a grown disk's old record"
        );
        assert!(!is_intent(&[0u8; INTENT_LEN], size));
        assert!(!is_intent(&intent(size)[..100], size), "short");
        let mut extra = intent(size);
        extra[INTENT_LEN - 1] = 1;
        assert!(!is_intent(&extra, size), "anything after the size is zero");
        assert_eq!(intent_offset(size), size - 4096);
        assert_eq!(fs_blocks(size), (size - (1 << 20)) / 4096);
        assert_eq!(fs_blocks(1000), 0);
    }

    proptest! {
        /// Arbitrary tails are never taken for the intent.
        #[test]
        fn arbitrary_bytes_are_not_the_intent(b in proptest::collection::vec(any::<u8>(), 0..4200), size in any::<u64>()) {
            prop_assert_eq!(is_intent(&b, size), b == intent(size));
        }
    }

    /// A disk image made by the real mke2fs (the host's e2fsprogs), read back.
    fn mke2fs_head(args: &[&str]) -> Option<Vec<u8>> {
        let dir = tempfile::tempdir().expect("tmp");
        let img = dir.path().join("img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(64 << 20))
            .expect("image");
        let ok = std::process::Command::new("mke2fs")
            .args(["-q", "-F"])
            .args(args)
            .arg(&img)
            .stdin(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: no mke2fs on this host");
            return None;
        }
        let mut b = std::fs::read(&img).expect("read");
        b.truncate(BLANK_SPAN as usize);
        Some(b)
    }

    #[test]
    fn our_ext4_from_real_mke2fs_is_ours() {
        let Some(b) = mke2fs_head(&["-t", "ext4", "-b", "4096", "-L", LABEL]) else {
            return;
        };
        match identify(&b[..HEAD_LEN]) {
            Content::Ours(e) => {
                assert_eq!(e.kind, "ext4");
                assert_eq!((e.block_size, e.blocks), (4096, 16384));
                assert_eq!(e.bytes(), 64 << 20);
                assert!(e.clean && !e.has_errors() && !e.needs_recovery, "{e:?}");
                assert!(e.free_blocks > 0 && e.free_blocks < e.blocks);
            }
            other => panic!("{other:?}"),
        }
        // The whole first MiB says the same.
        assert!(matches!(identify(&b), Content::Ours(_)));
    }

    #[test]
    fn other_ext_filesystems_are_named_by_kind_and_label() {
        for (args, want) in [
            (
                &["-t", "ext4", "-L", "data"][..],
                "an ext4 filesystem labelled `data`",
            ),
            (&["-t", "ext2"][..], "an ext2 filesystem with no label"),
            (
                &["-t", "ext3", "-L", "openshell-stat"][..],
                "an ext3 filesystem labelled `openshell-stat`",
            ),
        ] {
            let Some(b) = mke2fs_head(args) else { return };
            assert_eq!(identify(&b), Content::Foreign(want.into()), "{args:?}");
        }
    }

    #[test]
    fn state_and_error_fields_are_read() {
        let Some(mut b) = mke2fs_head(&["-t", "ext4", "-L", LABEL]) else {
            return;
        };
        let sb = SUPERBLOCK;
        b[sb + 0x3A..sb + 0x3C].copy_from_slice(&(STATE_ERROR).to_le_bytes());
        let incompat = u32_at(&b, sb + 0x60).expect("incompat") | INCOMPAT_RECOVER;
        b[sb + 0x60..sb + 0x64].copy_from_slice(&incompat.to_le_bytes());
        let Content::Ours(e) = identify(&b) else {
            panic!("still ours")
        };
        assert!(!e.clean && e.error_flag && e.needs_recovery && e.has_errors());
        b[sb + 0x3A..sb + 0x3C].copy_from_slice(&STATE_VALID.to_le_bytes());
        b[sb + 0x194..sb + 0x198].copy_from_slice(&3u32.to_le_bytes());
        let Content::Ours(e) = identify(&b) else {
            panic!("still ours")
        };
        assert!(e.clean && !e.error_flag && e.error_count == 3 && e.has_errors());
        // A block size ext4 cannot have.
        b[sb + 0x18..sb + 0x1C].copy_from_slice(&9u32.to_le_bytes());
        assert!(
            matches!(identify(&b), Content::Foreign(d) if d.contains("cannot be right")),
            "{:?}",
            identify(&b)
        );
    }

    fn mbr(types: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; HEAD_LEN];
        b[510] = 0x55;
        b[511] = 0xAA;
        for (i, t) in types.iter().enumerate() {
            b[446 + 16 * i + 4] = *t;
        }
        b
    }

    #[test]
    fn partition_tables_are_found_even_over_our_filesystem() {
        assert_eq!(
            identify(&mbr(&[0x83, 0x82])),
            Content::Foreign("an MBR partition table (2 partitions)".into())
        );
        assert_eq!(
            identify(&mbr(&[0xEE])),
            Content::Foreign("a GPT partition table (protective MBR)".into())
        );
        let mut gpt = vec![0u8; HEAD_LEN];
        gpt[512..520].copy_from_slice(b"EFI PART");
        assert_eq!(
            identify(&gpt),
            Content::Foreign("a GPT partition table".into())
        );
        let Some(mut ours) = mke2fs_head(&["-t", "ext4", "-L", LABEL]) else {
            return;
        };
        ours[510] = 0x55;
        ours[511] = 0xAA;
        match identify(&ours) {
            Content::Foreign(d) => assert!(
                d.starts_with("an MBR partition table")
                    && d.ends_with("labelled `openshell-state`"),
                "{d}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_signatures_are_named() {
        let at = |off: usize, magic: &[u8], len: usize| {
            let mut b = vec![0u8; len];
            b[off..off + magic.len()].copy_from_slice(magic);
            b
        };
        let mut fat = mbr(&[]);
        fat[82..90].copy_from_slice(b"FAT32   ");
        let mut ntfs = mbr(&[]);
        ntfs[3..11].copy_from_slice(b"NTFS    ");
        for (b, want) in [
            (fat, "a FAT filesystem"),
            (ntfs, "an NTFS filesystem"),
            (at(0, b"XFSB", HEAD_LEN), "an XFS filesystem"),
            (at(4086, b"SWAPSPACE2", HEAD_LEN), "a swap area"),
            (at(512, b"LABELONE", HEAD_LEN), "an LVM physical volume"),
            (at(65600, b"_BHRfS_M", 1 << 17), "a btrfs filesystem"),
            (at(32769, b"CD001", 1 << 16), "an ISO 9660 filesystem"),
            (
                at(4096, b"x", HEAD_LEN + 1),
                "unknown data (first non-zero byte at offset 4096)",
            ),
        ] {
            assert_eq!(identify(&b), Content::Foreign(want.into()));
        }
        assert_eq!(identify(&[0u8; HEAD_LEN]), Content::Zero);
        assert_eq!(identify(&[]), Content::Zero);
    }

    /// A real swap area (util-linux mkswap), where the host has it.
    #[test]
    fn a_real_swap_area_is_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let img = dir.path().join("swap");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(4 << 20))
            .expect("image");
        let made = std::process::Command::new("mkswap")
            .arg(&img)
            .output()
            .is_ok_and(|o| o.status.success());
        if !made {
            eprintln!("skipped: no mkswap on this host");
            return;
        }
        let b = std::fs::read(&img).expect("read");
        assert_eq!(
            identify(&b[..BLANK_SPAN as usize]),
            Content::Foreign("a swap area".into())
        );
    }

    #[test]
    fn blank_regions_cover_both_ends_and_the_backup_superblocks() {
        assert_eq!(blank_regions(0), vec![(0, 0)]);
        assert_eq!(blank_regions(4096), vec![(0, 4096)]);
        // 1.5 MiB: the last MiB overlaps the first; only its tail is read again.
        assert_eq!(
            blank_regions(3 << 19),
            vec![(0, BLANK_SPAN), (BLANK_SPAN, 1 << 19)]
        );
        let g = 1u64 << 30;
        assert_eq!(
            blank_regions(g),
            vec![
                (0, BLANK_SPAN),
                (g - BLANK_SPAN, BLANK_SPAN),
                (8193 * 1024, 1024),
                (16384 * 2048, 1024),
                (32768 * 4096, 1024),
            ]
        );
    }

    proptest! {
        /// Arbitrary bytes never panic, and count as zero only when they are.
        #[test]
        fn only_zeros_are_zero(b in proptest::collection::vec(any::<u8>(), 0..9000)) {
            let zero = b.iter().all(|&x| x == 0);
            prop_assert_eq!(identify(&b) == Content::Zero, zero);
        }

        /// A first MiB of zeros with any bytes written into it is never blank.
        #[test]
        fn a_first_mib_with_any_nonzero_byte_is_not_blank(
            writes in proptest::collection::vec((0usize..(1 << 20), 1u8..=255), 1..8)
        ) {
            let mut b = vec![0u8; BLANK_SPAN as usize];
            for (at, v) in &writes {
                b[*at] = *v;
            }
            prop_assert_ne!(identify(&b), Content::Zero);
        }
    }
}
