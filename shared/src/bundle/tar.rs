//! The tar dialect of bundles: POSIX ustar headers with PAX extended headers (`x`) for long
//! paths, large numbers and xattrs (`SCHILY.xattr.<name>`, as GNU tar and bsdtar write them), so
//! `tar --xattrs -tvf` reads a bundle. Written and read here, not by a general tar library: the
//! reader takes hostile input and refuses what a bundle never holds (GNU long names, global
//! headers, sparse files) and anything over its limits, before allocating for it.

use std::io::{self, Read, Write};

const BLOCK: usize = 512;
/// A PAX header's records, at most: paths, a link target and the xattrs of one file.
pub const MAX_PAX_BYTES: u64 = 1 << 20;
/// Longest path or link target accepted (Linux's PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    HardLink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

impl Kind {
    fn flag(self) -> u8 {
        match self {
            Kind::File => b'0',
            Kind::HardLink => b'1',
            Kind::Symlink => b'2',
            Kind::Char => b'3',
            Kind::Block => b'4',
            Kind::Dir => b'5',
            Kind::Fifo => b'6',
        }
    }

    fn from_flag(flag: u8) -> Option<Kind> {
        Some(match flag {
            b'0' | 0 => Kind::File,
            b'1' => Kind::HardLink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Dir,
            b'6' => Kind::Fifo,
            _ => return None,
        })
    }
}

/// Extended attributes, name and value.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// One entry's metadata; its `size` bytes of content follow it in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Permission bits with set-id and sticky (`0o7777`), never the file type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    /// Content bytes: non-zero for `File` only.
    pub size: u64,
    /// Symlink target or hard link's first name.
    pub link: Vec<u8>,
    /// Device major and minor (`Char`, `Block`).
    pub dev: (u32, u32),
    /// Extended attributes, name and value, in the order read.
    pub xattrs: Xattrs,
}

impl Header {
    /// A regular file's header with everything else zero: outer bundle members.
    pub fn file(path: &str, size: u64, mode: u32) -> Header {
        Header {
            path: path.as_bytes().to_vec(),
            kind: Kind::File,
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            size,
            link: Vec::new(),
            dev: (0, 0),
            xattrs: Vec::new(),
        }
    }
}

/// Why a tar stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("read: {0}")]
    Io(#[from] io::Error),
    #[error("the archive ends inside an entry or before its end marker (truncated)")]
    Truncated,
    #[error("header at byte {offset}: {what}")]
    BadHeader { offset: u64, what: String },
}

/// Writes `header` (with a PAX header before it when a field does not fit ustar).
pub fn write_header<W: Write>(w: &mut W, h: &Header) -> io::Result<()> {
    let mut pax = Vec::new();
    if h.path.len() > 100 {
        pax_record(&mut pax, b"path", &h.path);
    }
    if h.link.len() > 100 {
        pax_record(&mut pax, b"linkpath", &h.link);
    }
    if h.size >= 1 << 33 {
        pax_record(&mut pax, b"size", h.size.to_string().as_bytes());
    }
    if u64::from(h.uid) >= 1 << 21 {
        pax_record(&mut pax, b"uid", h.uid.to_string().as_bytes());
    }
    if u64::from(h.gid) >= 1 << 21 {
        pax_record(&mut pax, b"gid", h.gid.to_string().as_bytes());
    }
    if h.mtime >= 1 << 33 {
        pax_record(&mut pax, b"mtime", h.mtime.to_string().as_bytes());
    }
    for (name, value) in &h.xattrs {
        pax_record(&mut pax, &[b"SCHILY.xattr.", &name[..]].concat(), value);
    }
    if !pax.is_empty() {
        let mut x = Header::file("././@PaxHeader", pax.len() as u64, 0o644);
        x.path = pax_name(&h.path);
        w.write_all(&ustar_block(&x, b'x'))?;
        w.write_all(&pax)?;
        w.write_all(&vec![0; padding(pax.len() as u64)])?;
    }
    w.write_all(&ustar_block(h, h.kind.flag()))
}

/// Pads an entry's content written after its header to the block size.
pub fn write_padding<W: Write>(w: &mut W, size: u64) -> io::Result<()> {
    w.write_all(&vec![0; padding(size)])
}

/// The end of archive: two zero blocks.
pub fn write_end<W: Write>(w: &mut W) -> io::Result<()> {
    w.write_all(&[0; 2 * BLOCK])
}

fn padding(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

/// `PaxHeaders/<name>` as GNU tar names an extended header (informational only).
fn pax_name(path: &[u8]) -> Vec<u8> {
    let base = path.rsplit(|b| *b == b'/').next().unwrap_or(path);
    let mut name = b"PaxHeaders/".to_vec();
    name.extend_from_slice(&base[..base.len().min(80)]);
    name
}

/// One `LEN key=value\n` record; LEN counts itself.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn ustar_block(h: &Header, flag: u8) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    let name = &h.path[..h.path.len().min(100)];
    b[..name.len()].copy_from_slice(name);
    octal(&mut b[100..108], u64::from(h.mode & 0o7777));
    octal(&mut b[108..116], u64::from(h.uid).min(0o7777777));
    octal(&mut b[116..124], u64::from(h.gid).min(0o7777777));
    octal(&mut b[124..136], h.size.min(0o77777777777));
    octal(&mut b[136..148], h.mtime.min(0o77777777777));
    b[156] = flag;
    let link = &h.link[..h.link.len().min(100)];
    b[157..157 + link.len()].copy_from_slice(link);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    octal(&mut b[329..337], u64::from(h.dev.0).min(0o7777777));
    octal(&mut b[337..345], u64::from(h.dev.1).min(0o7777777));
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|x| u32::from(*x)).sum();
    octal(&mut b[148..155], u64::from(sum));
    b
}

/// Zero-padded octal with a terminating NUL, as ustar wants.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    field[digits] = 0;
}

/// Reads entries one at a time; the content of the current one through [`Reader::body`].
pub struct Reader<R> {
    inner: R,
    /// Bytes read so far, for error messages.
    offset: u64,
    /// Unread content and padding of the current entry.
    remaining: u64,
    padding: u64,
}

impl<R: Read> Reader<R> {
    pub fn new(inner: R) -> Self {
        Reader {
            inner,
            offset: 0,
            remaining: 0,
            padding: 0,
        }
    }

    /// The next entry's header, `None` at the end marker. Skips what is left of the current
    /// entry's content.
    pub fn next_entry(&mut self) -> Result<Option<Header>, TarError> {
        self.skip_rest()?;
        let mut pax = None;
        loop {
            let start = self.offset;
            let mut block = [0u8; BLOCK];
            self.fill(&mut block)?;
            if block.iter().all(|b| *b == 0) {
                if pax.is_some() {
                    return Err(bad(start, "an extended header with no entry after it"));
                }
                return Ok(None);
            }
            let mut h = parse_ustar(&block).map_err(|what| bad(start, what))?;
            if block[156] == b'x' {
                if pax.is_some() {
                    return Err(bad(start, "two extended headers in a row"));
                }
                if h.size > MAX_PAX_BYTES {
                    return Err(bad(
                        start,
                        format!(
                            "extended header of {} bytes (limit {MAX_PAX_BYTES})",
                            h.size
                        ),
                    ));
                }
                let mut records = vec![0; h.size as usize];
                self.fill(&mut records)?;
                self.skip(padding(h.size) as u64)?;
                pax = Some(records);
                continue;
            }
            if let Some(records) = pax {
                apply_pax(&mut h, &records).map_err(|what| bad(start, what))?;
            }
            check_lengths(&h).map_err(|what| bad(start, what))?;
            if h.kind != Kind::File && h.size != 0 {
                return Err(bad(start, format!("a {:?} entry with content", h.kind)));
            }
            self.remaining = h.size;
            self.padding = padding(h.size) as u64;
            return Ok(Some(h));
        }
    }

    /// The current entry's unread content.
    pub fn body(&mut self) -> Body<'_, R> {
        Body { reader: self }
    }

    /// The byte offset reached, for messages.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The underlying reader, positioned after what was read.
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn skip_rest(&mut self) -> Result<(), TarError> {
        let n = self.remaining + self.padding;
        self.remaining = 0;
        self.padding = 0;
        self.skip(n)
    }

    fn skip(&mut self, n: u64) -> Result<(), TarError> {
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        self.offset += copied;
        if copied < n {
            return Err(TarError::Truncated);
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), TarError> {
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.offset += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(TarError::Truncated),
            Err(e) => Err(e.into()),
        }
    }
}

/// The current entry's content; ends at its size. A stream that ends sooner is an
/// `UnexpectedEof` error, never a short file.
pub struct Body<'a, R> {
    reader: &'a mut Reader<R>,
}

impl<R: Read> Read for Body<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = &mut *self.reader;
        if r.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(r.remaining).unwrap_or(usize::MAX));
        let n = r.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside an entry (truncated)",
            ));
        }
        r.remaining -= n as u64;
        r.offset += n as u64;
        Ok(n)
    }
}

fn bad(offset: u64, what: impl Into<String>) -> TarError {
    TarError::BadHeader {
        offset,
        what: what.into(),
    }
}

fn parse_ustar(b: &[u8; BLOCK]) -> Result<Header, String> {
    if &b[257..263] != b"ustar\0" || &b[263..265] != b"00" {
        return Err("not a POSIX ustar header".into());
    }
    let stored = parse_octal(&b[148..156], "checksum")?;
    let mut copy = *b;
    copy[148..156].fill(b' ');
    let sum: u64 = copy.iter().map(|x| u64::from(*x)).sum();
    if sum != stored {
        return Err(format!(
            "header checksum {stored} but the block sums to {sum}"
        ));
    }
    let flag = b[156];
    let kind = if flag == b'x' {
        Kind::File
    } else {
        Kind::from_flag(flag).ok_or_else(|| {
            format!(
                "entry type {:?} (a bundle holds files, directories, links, devices and fifos only)",
                char::from(flag)
            )
        })?
    };
    let mut path = cstr(&b[345..500]).to_vec();
    if !path.is_empty() {
        path.push(b'/');
    }
    path.extend_from_slice(cstr(&b[..100]));
    Ok(Header {
        path,
        kind,
        mode: u32::try_from(parse_octal(&b[100..108], "mode")? & 0o7777).unwrap_or(0),
        uid: small(parse_octal(&b[108..116], "uid")?, "uid")?,
        gid: small(parse_octal(&b[116..124], "gid")?, "gid")?,
        size: parse_octal(&b[124..136], "size")?,
        mtime: parse_octal(&b[136..148], "mtime")?,
        link: cstr(&b[157..257]).to_vec(),
        dev: (
            small(parse_octal(&b[329..337], "devmajor")?, "devmajor")?,
            small(parse_octal(&b[337..345], "devminor")?, "devminor")?,
        ),
        xattrs: Vec::new(),
    })
}

fn small(v: u64, field: &str) -> Result<u32, String> {
    u32::try_from(v).map_err(|_| format!("{field} {v} is too large"))
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    &field[..end]
}

fn parse_octal(field: &[u8], name: &str) -> Result<u64, String> {
    let text = cstr(field);
    let text = std::str::from_utf8(text).map_err(|_| format!("{name} is not octal text"))?;
    let text = text.trim_matches(' ');
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).map_err(|_| format!("{name} {text:?} is not an octal number"))
}

/// Applies PAX records to the ustar header they precede.
fn apply_pax(h: &mut Header, mut records: &[u8]) -> Result<(), String> {
    while !records.is_empty() {
        let space = records
            .iter()
            .position(|b| *b == b' ')
            .ok_or("extended header record without a length")?;
        let len: usize = std::str::from_utf8(&records[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("extended header record length is not a number")?;
        if len <= space + 1 || len > records.len() || records[len - 1] != b'\n' {
            return Err("extended header record length does not match its text".into());
        }
        let record = &records[space + 1..len - 1];
        records = &records[len..];
        let eq = record
            .iter()
            .position(|b| *b == b'=')
            .ok_or("extended header record without '='")?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        let number = |field: &str| -> Result<u64, String> {
            std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.split('.').next())
                .and_then(|s| s.parse().ok())
                .ok_or(format!("extended header {field} is not a number"))
        };
        match key {
            b"path" => h.path = value.to_vec(),
            b"linkpath" => h.link = value.to_vec(),
            b"size" => h.size = number("size")?,
            b"uid" => h.uid = small(number("uid")?, "uid")?,
            b"gid" => h.gid = small(number("gid")?, "gid")?,
            b"mtime" => h.mtime = number("mtime")?,
            _ => {
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    h.xattrs.push((name.to_vec(), value.to_vec()));
                }
                // Other keys (atime, ctime, uname, ...) carry nothing a boot needs.
            }
        }
    }
    Ok(())
}

fn check_lengths(h: &Header) -> Result<(), String> {
    if h.path.len() > MAX_PATH_BYTES || h.link.len() > MAX_PATH_BYTES {
        return Err(format!("a path or link target over {MAX_PATH_BYTES} bytes"));
    }
    if h.path.contains(&0) || h.link.contains(&0) {
        return Err("a path or link target with a NUL byte".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &[u8], kind: Kind) -> Header {
        Header {
            path: path.to_vec(),
            kind,
            mode: 0o4755,
            uid: 3_000_000,
            gid: 7,
            mtime: 1_700_000_000,
            size: 0,
            link: Vec::new(),
            dev: (0, 0),
            xattrs: Vec::new(),
        }
    }

    #[test]
    fn headers_round_trip_with_long_fields_and_xattrs() {
        let mut file = entry(&[b'a'; 300], Kind::File);
        file.size = 5;
        file.xattrs = vec![
            (b"security.capability".to_vec(), vec![1, 0, 0, 2, b'\n', 0]),
            (b"user.x".to_vec(), b"y".to_vec()),
        ];
        let mut link = entry(b"l", Kind::Symlink);
        link.link = vec![b'b'; 200];
        let mut dev = entry(b"dev/null", Kind::Char);
        dev.dev = (1, 3);
        let mut out = Vec::new();
        write_header(&mut out, &file).expect("write");
        out.extend_from_slice(b"hello");
        write_padding(&mut out, 5).expect("pad");
        write_header(&mut out, &link).expect("write");
        write_header(&mut out, &dev).expect("write");
        write_end(&mut out).expect("end");
        let mut r = Reader::new(&out[..]);
        assert_eq!(r.next_entry().expect("1"), Some(file));
        let mut body = Vec::new();
        r.body().read_to_end(&mut body).expect("body");
        assert_eq!(body, b"hello");
        assert_eq!(r.next_entry().expect("2"), Some(link));
        assert_eq!(r.next_entry().expect("3"), Some(dev));
        assert_eq!(r.next_entry().expect("end"), None);
    }

    #[test]
    fn a_flipped_byte_in_a_header_is_a_checksum_error() {
        let mut out = Vec::new();
        write_header(&mut out, &entry(b"etc", Kind::Dir)).expect("write");
        out[3] ^= 1;
        let err = Reader::new(&out[..]).next_entry().unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn gnu_long_names_and_oversize_extended_headers_are_refused() {
        let mut out = Vec::new();
        write_header(&mut out, &entry(b"x", Kind::Dir)).expect("write");
        out[156] = b'L';
        out[148..156].fill(b' ');
        let sum: u32 = out[..512].iter().map(|x| u32::from(*x)).sum();
        octal(&mut out[148..155], u64::from(sum));
        let err = Reader::new(&out[..]).next_entry().unwrap_err();
        assert!(err.to_string().contains("entry type 'L'"), "{err}");

        let mut x = Header::file("PaxHeaders/x", MAX_PAX_BYTES + 1, 0o644);
        x.path = b"PaxHeaders/x".to_vec();
        let block = ustar_block(&x, b'x');
        let err = Reader::new(&block[..]).next_entry().unwrap_err();
        assert!(err.to_string().contains("extended header of"), "{err}");
    }

    #[test]
    fn a_stream_cut_inside_a_body_is_an_error_not_a_short_file() {
        let mut out = Vec::new();
        let mut file = entry(b"f", Kind::File);
        file.size = 1000;
        write_header(&mut out, &file).expect("write");
        out.extend_from_slice(&[7; 100]);
        let mut r = Reader::new(&out[..]);
        r.next_entry().expect("header");
        let err = r.body().read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(matches!(r.next_entry(), Err(TarError::Truncated)));
    }

    #[test]
    fn pax_record_lengths_count_themselves() {
        for n in [0, 1, 5, 6, 7, 90, 95, 96, 97, 990, 996] {
            let mut out = Vec::new();
            pax_record(&mut out, b"k", &vec![b'v'; n]);
            let len: usize =
                std::str::from_utf8(&out[..out.iter().position(|b| *b == b' ').unwrap()])
                    .unwrap()
                    .parse()
                    .unwrap();
            assert_eq!(len, out.len(), "value of {n} bytes");
        }
    }
}
