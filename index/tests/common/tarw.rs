//! A small tar writer for crafted layers: ustar headers, with a PAX header
//! first when a name, target, time or xattr does not fit ustar.

#[derive(Clone, Debug)]
pub struct H {
    pub name: Vec<u8>,
    /// Typeflag: b'0' file, b'5' dir, b'2' symlink, b'1' hardlink, b'3'
    /// char, b'4' block, b'6' fifo.
    pub kind: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: (i64, u32),
    pub link: Vec<u8>,
    pub dev: (u32, u32),
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub data: Vec<u8>,
}

impl H {
    pub fn new(name: &str, kind: u8) -> H {
        H {
            name: name.as_bytes().to_vec(),
            kind,
            mode: if kind == b'5' { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            mtime: (1_700_000_000, 0),
            link: Vec::new(),
            dev: (0, 0),
            xattrs: Vec::new(),
            data: Vec::new(),
        }
    }
    pub fn file(name: &str, data: &[u8]) -> H {
        let mut h = H::new(name, b'0');
        h.data = data.to_vec();
        h
    }
    pub fn dir(name: &str) -> H {
        H::new(name, b'5')
    }
    pub fn symlink(name: &str, target: &str) -> H {
        let mut h = H::new(name, b'2');
        h.link = target.as_bytes().to_vec();
        h.mode = 0o777;
        h
    }
    pub fn hardlink(name: &str, target: &str) -> H {
        let mut h = H::new(name, b'1');
        h.link = target.as_bytes().to_vec();
        h
    }
}

#[derive(Default)]
pub struct TarW {
    pub buf: Vec<u8>,
}

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{:0w$o}\0", v, w = field.len() - 1);
    field.copy_from_slice(s.as_bytes());
}

fn pad(buf: &mut Vec<u8>) {
    let r = buf.len() % 512;
    if r != 0 {
        buf.resize(buf.len() + 512 - r, 0);
    }
}

fn header(h: &H, size: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    let n = h.name.len().min(100);
    b[..n].copy_from_slice(&h.name[..n]);
    octal(&mut b[100..108], h.mode as u64);
    octal(&mut b[108..116], h.uid.min(0o7777777));
    octal(&mut b[116..124], h.gid.min(0o7777777));
    octal(&mut b[124..136], size);
    octal(&mut b[136..148], h.mtime.0.max(0) as u64);
    b[156] = h.kind;
    let l = h.link.len().min(100);
    b[157..157 + l].copy_from_slice(&h.link[..l]);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    octal(&mut b[329..337], h.dev.0 as u64);
    octal(&mut b[337..345], h.dev.1 as u64);
    b[148..156].copy_from_slice(b"        ");
    let sum: u32 = b.iter().map(|&c| c as u32).sum();
    b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    b
}

fn record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // "LEN key=value\n", LEN counting itself.
    let body = key.len() + value.len() + 3;
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

impl TarW {
    pub fn add(&mut self, h: &H) -> &mut Self {
        let mut pax = Vec::new();
        if h.name.len() > 100 {
            record(&mut pax, b"path", &h.name);
        }
        if h.link.len() > 100 {
            record(&mut pax, b"linkpath", &h.link);
        }
        if h.mtime.1 != 0 || h.mtime.0 < 0 {
            let t = if h.mtime.1 != 0 {
                format!("{}.{:09}", h.mtime.0, h.mtime.1)
            } else {
                h.mtime.0.to_string()
            };
            record(&mut pax, b"mtime", t.as_bytes());
        }
        if h.uid > 0o7777777 {
            record(&mut pax, b"uid", h.uid.to_string().as_bytes());
        }
        if h.gid > 0o7777777 {
            record(&mut pax, b"gid", h.gid.to_string().as_bytes());
        }
        for (k, v) in &h.xattrs {
            record(&mut pax, format!("SCHILY.xattr.{k}").as_bytes(), v);
        }
        if !pax.is_empty() {
            let mut ph = H::new("PaxHeader", b'x');
            ph.mtime = (0, 0);
            let ph = header(&ph, pax.len() as u64);
            self.buf.extend_from_slice(&ph);
            self.buf.extend_from_slice(&pax);
            pad(&mut self.buf);
        }
        let size = if h.kind == b'0' {
            h.data.len() as u64
        } else {
            0
        };
        let hb = header(h, size);
        self.buf.extend_from_slice(&hb);
        if h.kind == b'0' {
            self.buf.extend_from_slice(&h.data);
            pad(&mut self.buf);
        }
        self
    }

    /// The archive with its end-of-archive blocks.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut b = std::mem::take(&mut self.buf);
        b.resize(b.len() + 1024, 0);
        b
    }
}
