//! What kind of file a stream reads: detected from its first bytes (magic numbers), with the
//! extension as fallback, and grouped the way the predictor uses it.

pub use augur_proto::meta::FileType as Group;

/// A detected format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    Gif,
    Webp,
    Tiff,
    Bmp,
    /// SQLite 3 with its page size in bytes.
    Sqlite {
        page_size: u32,
    },
    Parquet,
    Zip,
    Gzip,
    Pdf,
    Elf,
    Unknown,
}

/// Bytes of a file's head that detection looks at.
pub const HEAD_BYTES: usize = 100;

/// The group of a file whose bytes start with `bytes` (its first `HEAD_BYTES` are looked at;
/// no name to fall back on).
pub fn group_of_head(bytes: &[u8]) -> Group {
    Format::detect(&bytes[..bytes.len().min(HEAD_BYTES)], None).group()
}

impl Format {
    pub fn group(self) -> Group {
        match self {
            Format::Jpeg | Format::Png | Format::Gif | Format::Webp | Format::Tiff | Format::Bmp => {
                Group::Image
            }
            Format::Sqlite { .. } | Format::Parquet => Group::Database,
            _ => Group::Other,
        }
    }

    /// Detects from the first bytes (`head`, up to `HEAD_BYTES`); `name` is the fallback.
    pub fn detect(head: &[u8], name: Option<&str>) -> Format {
        let f = Self::from_magic(head);
        if f != Format::Unknown {
            return f;
        }
        name.map_or(Format::Unknown, Self::from_extension)
    }

    pub fn from_magic(h: &[u8]) -> Format {
        let starts = |m: &[u8]| h.starts_with(m);
        if starts(&[0xFF, 0xD8, 0xFF]) {
            Format::Jpeg
        } else if starts(b"\x89PNG\r\n\x1a\n") {
            Format::Png
        } else if starts(b"GIF87a") || starts(b"GIF89a") {
            Format::Gif
        } else if h.len() >= 12 && &h[..4] == b"RIFF" && &h[8..12] == b"WEBP" {
            Format::Webp
        } else if starts(b"II*\0") || starts(b"MM\0*") {
            Format::Tiff
        } else if starts(b"BM") && h.len() >= 14 {
            Format::Bmp
        } else if starts(b"SQLite format 3\0") && h.len() >= 18 {
            // Page size: big-endian u16 at offset 16; 1 means 65536.
            let raw = u32::from(u16::from_be_bytes([h[16], h[17]]));
            Format::Sqlite { page_size: if raw == 1 { 65536 } else { raw } }
        } else if starts(b"PAR1") {
            Format::Parquet
        } else if starts(b"PK\x03\x04") || starts(b"PK\x05\x06") {
            Format::Zip
        } else if starts(&[0x1F, 0x8B]) {
            Format::Gzip
        } else if starts(b"%PDF-") {
            Format::Pdf
        } else if starts(b"\x7fELF") {
            Format::Elf
        } else {
            Format::Unknown
        }
    }

    pub fn from_extension(name: &str) -> Format {
        let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
        match ext.as_str() {
            "jpg" | "jpeg" => Format::Jpeg,
            "png" => Format::Png,
            "gif" => Format::Gif,
            "webp" => Format::Webp,
            "tif" | "tiff" => Format::Tiff,
            "bmp" => Format::Bmp,
            "db" | "sqlite" | "sqlite3" => Format::Sqlite { page_size: 4096 },
            "parquet" => Format::Parquet,
            "zip" | "jar" => Format::Zip,
            "gz" | "tgz" => Format::Gzip,
            "pdf" => Format::Pdf,
            _ => Format::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A complete 1x1 PNG as written by libpng.
    const PNG_1X1: [u8; 67] = [
        0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x48, 0x44, 0x52, 0x00,
        0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1F, 0x15, 0xC4, 0x89, 0x00,
        0x00, 0x00, 0x0A, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9C, 0x63, 0x00, 0x01, 0x00, 0x00, 0x05, 0x00, 0x01,
        0x0D, 0x0A, 0x2D, 0xB4, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4E, 0x44, 0xAE, 0x42, 0x60, 0x82,
    ];
    /// A complete 1x1 transparent GIF89a.
    const GIF_1X1: [u8; 43] = [
        0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0x00,
        0x00, 0x00, 0x21, 0xF9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2C, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00,
        0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3B,
    ];
    /// The head of a JFIF JPEG (SOI, APP0 "JFIF").
    const JPEG_HEAD: [u8; 20] = [
        0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, 0x4A, 0x46, 0x49, 0x46, 0x00, 0x01, 0x01, 0x01, 0x00, 0x48, 0x00,
        0x48, 0x00, 0x00,
    ];
    /// The head of a lossy WebP (RIFF size, "WEBP", "VP8 ").
    const WEBP_HEAD: [u8; 16] = *b"RIFF\x1a\x00\x00\x00WEBPVP8 ";
    /// The head of a little-endian TIFF.
    const TIFF_HEAD: [u8; 8] = [0x49, 0x49, 0x2A, 0x00, 0x08, 0x00, 0x00, 0x00];

    #[test]
    fn images_are_recognised_by_their_magic() {
        assert_eq!(Format::from_magic(&PNG_1X1), Format::Png);
        assert_eq!(Format::from_magic(&GIF_1X1), Format::Gif);
        assert_eq!(Format::from_magic(&JPEG_HEAD), Format::Jpeg);
        assert_eq!(Format::from_magic(&WEBP_HEAD), Format::Webp);
        assert_eq!(Format::from_magic(&TIFF_HEAD), Format::Tiff);
        for f in [Format::Png, Format::Gif, Format::Jpeg, Format::Webp, Format::Tiff] {
            assert_eq!(f.group(), Group::Image);
        }
    }

    #[test]
    fn a_real_sqlite_database_gives_its_page_size() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let out = std::process::Command::new("sqlite3")
            .arg(&db)
            .arg("PRAGMA page_size=8192; CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .output()
            .expect("sqlite3 is installed by scripts/setup.sh");
        assert!(out.status.success());
        let head = std::fs::read(&db).unwrap();
        let f = Format::detect(&head[..HEAD_BYTES], Some("t.db"));
        assert_eq!(f, Format::Sqlite { page_size: 8192 });
        assert_eq!(f.group(), Group::Database);
    }

    #[test]
    fn unknown_content_falls_back_to_the_extension() {
        assert_eq!(Format::detect(b"hello", Some("photo.JPG")), Format::Jpeg);
        assert_eq!(Format::detect(b"hello", Some("x.parquet")).group(), Group::Database);
        assert_eq!(Format::detect(b"hello", Some("notes.txt")), Format::Unknown);
        assert_eq!(Format::detect(b"PAR1....", None), Format::Parquet);
        assert_eq!(
            group_of_head(&[&b"\x89PNG\r\n\x1a\n"[..], &[0; 4096]].concat()),
            Group::Image,
            "a whole block"
        );
        assert_eq!(group_of_head(b"SQLite format 3\0\x10\0"), Group::Database, "a short head");
        assert_eq!(Format::detect(b"PK\x03\x04rest", Some("a.png")), Format::Zip, "magic wins over the name");
        assert_eq!(Format::Unknown.group(), Group::Other);
    }
}
