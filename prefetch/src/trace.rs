//! Access streams and the trace files they come from.
//!
//! The shared CSV shape (`.csv` or `.csv.gz`): header
//! `timestamp_us,op,offset_bytes,size_bytes,volume_or_object_id`, `op` is `R` or `W`. The
//! client's own traces (`augur mount --trace`) add a sixth column, `file_type` (`image`,
//! `database` or `other`: the type group the mount knew for the file when the request came),
//! under `CLIENT_CSV_HEADER`; a trace without it is all `other`.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::filetype::Group;

/// Largest trace read into memory, in records (a trace is replayed whole).
pub const TRACE_RECORDS_MAX: usize = 50_000_000;
/// Largest request a trace may hold, in bytes: the replay walks every block a request covers,
/// so a corrupt size field must not stand for millions of blocks. Real traces' requests are at
/// most a few MiB.
pub const REQUEST_BYTES_MAX: u64 = 64 << 20;
/// Most block touches (each request's blocks, summed) a trace may hold at the block size it is
/// replayed or featurised at ([`Trace::check_blocks`]): bounds the replay's work and the
/// footprint's memory whatever the requests' sizes.
pub const TRACE_BLOCKS_MAX: u64 = 200_000_000;
/// Longest line read, in bytes (a line of the shared shape is under 100).
pub const LINE_BYTES_MAX: usize = 4096;
/// Largest timestamp accepted, in µs (about 146 000 years): the replay adds fetch latencies to
/// times, which must not overflow.
pub const TIMESTAMP_US_MAX: u64 = 1 << 62;
/// The header every trace file starts with.
pub const CSV_HEADER: &str = "timestamp_us,op,offset_bytes,size_bytes,volume_or_object_id";
/// The header of a trace that also carries each request's file type group.
pub const CLIENT_CSV_HEADER: &str = "timestamp_us,op,offset_bytes,size_bytes,volume_or_object_id,file_type";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

/// One request of a trace (or one read seen by the client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub t_us: u64,
    pub op: Op,
    pub offset: u64,
    pub size: u64,
    /// The stream it belongs to: a volume/object in block traces, a file in client traces.
    pub stream: u64,
    /// The file's type group (client traces); `Other` in block traces.
    pub group: Group,
}

#[derive(Clone, Debug)]
pub struct Trace {
    pub name: String,
    pub accesses: Vec<Access>,
    /// False when the timestamps are only ordinals (the ARC traces): replay then spaces
    /// requests by a fixed inter-arrival time.
    pub timed: bool,
    /// The streams are files (a client trace, with the `file_type` column), which end where
    /// their data ends; in block traces they are devices.
    pub files: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path}: line {line}: {what}")]
    Bad { path: String, line: usize, what: String },
    #[error("{path}: more than {TRACE_RECORDS_MAX} lines")]
    TooLarge { path: String },
    #[error("{path}: {touches} block touches at {block_kib} KiB blocks, more than {TRACE_BLOCKS_MAX}")]
    TooManyBlocks { path: String, touches: u64, block_kib: u64 },
}

impl Trace {
    /// Reads a trace in the shared CSV shape, gzip-compressed when the name ends in `.gz`.
    pub fn read(path: &Path) -> Result<Trace, TraceError> {
        let p = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|error| TraceError::Io { path: p.clone(), error })?;
        let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::read::MultiGzDecoder::new(file))
        } else {
            Box::new(file)
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".gz").trim_end_matches(".csv").to_string())
            .unwrap_or_default();
        Self::parse(&p, &name, BufReader::new(reader))
    }

    pub fn parse(path: &str, name: &str, mut reader: impl BufRead) -> Result<Trace, TraceError> {
        let bad = |line: usize, what: String| TraceError::Bad { path: path.into(), line, what };
        let mut accesses = Vec::new();
        let mut ordinal = true;
        let mut fields = 0;
        let mut buf = Vec::new();
        for i in 0.. {
            let n = i + 1;
            if i > TRACE_RECORDS_MAX {
                return Err(TraceError::TooLarge { path: path.into() });
            }
            buf.clear();
            let read = (&mut reader)
                .take(LINE_BYTES_MAX as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(|error| TraceError::Io { path: path.into(), error })?;
            if read == 0 {
                break;
            }
            if buf.len() > LINE_BYTES_MAX {
                return Err(bad(n, format!("longer than {LINE_BYTES_MAX} bytes")));
            }
            let line = std::str::from_utf8(&buf).map_err(|e| bad(n, format!("not UTF-8 text: {e}")))?;
            let line = line.trim_end_matches(['\n', '\r']);
            if i == 0 {
                fields = match line.trim() {
                    CSV_HEADER => 5,
                    CLIENT_CSV_HEADER => 6,
                    _ => {
                        return Err(bad(
                            n,
                            format!(
                                "expected the header {CSV_HEADER:?} or {CLIENT_CSV_HEADER:?}, found {line:?}"
                            ),
                        ));
                    }
                };
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.trim().split(',').collect();
            if f.len() != fields {
                return Err(bad(n, format!("expected {fields} fields, found {}", f.len())));
            }
            let num = |k: usize, what: &str| -> Result<u64, TraceError> {
                f[k].parse().map_err(|_| bad(n, format!("{what} {:?} is not a non-negative integer", f[k])))
            };
            let op = match f[1] {
                "R" | "r" => Op::Read,
                "W" | "w" => Op::Write,
                other => return Err(bad(n, format!("op {other:?} is neither R nor W"))),
            };
            // Some traces write times as decimals ("8188.0"): whole microseconds are kept.
            let t_us = match f[0].parse::<u64>() {
                Ok(t) => t,
                Err(_) => match f[0].parse::<f64>() {
                    Ok(t) if t.is_finite() && t >= 0.0 => t.round() as u64,
                    _ => return Err(bad(n, format!("timestamp_us {:?} is not a non-negative number", f[0]))),
                },
            };
            let a = Access {
                t_us,
                op,
                offset: num(2, "offset_bytes")?,
                size: num(3, "size_bytes")?,
                stream: num(4, "volume_or_object_id")?,
                group: match f.get(5) {
                    Some(g) => g.parse().map_err(|e: String| bad(n, e))?,
                    None => Group::Other,
                },
            };
            if a.t_us > TIMESTAMP_US_MAX {
                return Err(bad(n, format!("timestamp_us {:?} is over {TIMESTAMP_US_MAX}", f[0])));
            }
            if a.size > REQUEST_BYTES_MAX {
                return Err(bad(
                    n,
                    format!(
                        "size_bytes {} is over the largest request accepted ({REQUEST_BYTES_MAX})",
                        a.size
                    ),
                ));
            }
            if a.offset.checked_add(a.size.saturating_sub(1)).is_none() {
                return Err(bad(
                    n,
                    format!("offset_bytes {} + size_bytes {} ends past byte 2^64 - 1", a.offset, a.size),
                ));
            }
            ordinal &= a.t_us == accesses.len() as u64;
            accesses.push(a);
        }
        if fields == 0 {
            return Err(bad(
                1,
                format!("empty file: expected the header {CSV_HEADER:?} or {CLIENT_CSV_HEADER:?}"),
            ));
        }
        Ok(Trace { name: name.into(), timed: !ordinal || accesses.is_empty(), files: fields == 6, accesses })
    }
}

/// Writes accesses in the shared CSV shape (gzip-compressed when `path` ends in `.gz`), with
/// the `file_type` column when `files` (the streams are files: a client trace) or any access
/// is of a file other than `Other`.
pub fn write_csv(path: &Path, accesses: &[Access], files: bool) -> Result<(), TraceError> {
    use std::io::Write;
    let p = path.display().to_string();
    let io = |error| TraceError::Io { path: p.clone(), error };
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w: Box<dyn Write> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::write::GzEncoder::new(file, flate2::Compression::default()))
    } else {
        Box::new(std::io::BufWriter::new(file))
    };
    let typed = files || accesses.iter().any(|a| a.group != Group::Other);
    writeln!(w, "{}", if typed { CLIENT_CSV_HEADER } else { CSV_HEADER }).map_err(io)?;
    for a in accesses {
        write_record(&mut w, a, typed).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok(())
}

/// One access as a CSV line; `typed`: with the `file_type` column.
pub fn write_record(w: &mut impl std::io::Write, a: &Access, typed: bool) -> std::io::Result<()> {
    let op = if a.op == Op::Read { 'R' } else { 'W' };
    write!(w, "{},{op},{},{},{}", a.t_us, a.offset, a.size, a.stream)?;
    if typed {
        write!(w, ",{}", a.group)?;
    }
    writeln!(w)
}

impl Trace {
    /// Fails when the trace, read from `path`, touches more than `TRACE_BLOCKS_MAX` blocks at
    /// `block_bytes`.
    pub fn check_blocks(&self, path: &Path, block_bytes: u64) -> Result<(), TraceError> {
        let mut touches = 0u64;
        for a in &self.accesses {
            let b = blocks_of(a, block_bytes);
            touches += b.end - b.start;
            if touches > TRACE_BLOCKS_MAX {
                return Err(TraceError::TooManyBlocks {
                    path: path.display().to_string(),
                    touches,
                    block_kib: block_bytes >> 10,
                });
            }
        }
        Ok(())
    }

    /// Distinct (stream, block) pairs the trace touches at `block_bytes`.
    pub fn footprint(&self, block_bytes: u64) -> usize {
        let mut seen = std::collections::HashSet::new();
        for a in &self.accesses {
            for b in blocks_of(a, block_bytes) {
                seen.insert((a.stream, b));
            }
        }
        seen.len()
    }
}

/// The blocks a request's byte range covers (a zero-length request touches its offset's block).
pub fn blocks_of(a: &Access, block_bytes: u64) -> std::ops::Range<u64> {
    let first = a.offset / block_bytes;
    let last = (a.offset + a.size.saturating_sub(1)) / block_bytes;
    first..last + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_shared_shape_and_detects_ordinal_time() {
        let text = format!("{CSV_HEADER}\n0,R,0,4096,0\n1,W,65536,131072,0\n2,R,100,1,3\n");
        let t = Trace::parse("x", "x", text.as_bytes()).unwrap();
        assert_eq!(t.accesses.len(), 3);
        assert!(!t.timed, "ordinal timestamps mean untimed");
        assert_eq!(
            t.accesses[1],
            Access { t_us: 1, op: Op::Write, offset: 65536, size: 131072, stream: 0, group: Group::Other }
        );
        assert_eq!(blocks_of(&t.accesses[1], 65536), 1..3);
        assert_eq!(t.footprint(65536), 4);
        let timed = format!("{CSV_HEADER}\n5,R,0,1,0\n90.0,R,0,1,0\n");
        assert!(Trace::parse("x", "x", timed.as_bytes()).unwrap().timed);
    }

    #[test]
    fn bad_input_names_line_and_field() {
        let error = |text: String| Trace::parse("t.csv", "t", text.as_bytes()).unwrap_err().to_string();
        let e = error("a,b\n".into());
        assert!(e.contains("line 1") && e.contains("header"), "{e}");
        let e = error(format!("{CSV_HEADER}\n0,X,0,1,0\n"));
        assert!(e.contains("line 2") && e.contains("op"), "{e}");
        let e = error(format!("{CSV_HEADER}\n0,R,-5,1,0\n"));
        assert!(e.contains("offset_bytes"), "{e}");
        let e = error(format!("{CLIENT_CSV_HEADER}\n0,R,0,1,0,movie\n"));
        assert!(e.contains("line 2") && e.contains("movie"), "{e}");
        let e = error(format!("{CLIENT_CSV_HEADER}\n0,R,0,1,0\n"));
        assert!(e.contains("expected 6 fields"), "{e}");
        let e = error(format!("{CSV_HEADER}\n1e300,R,0,4096,0\n"));
        assert!(e.contains("line 2: timestamp_us \"1e300\" is over"), "{e}");
        let e = error(String::new());
        assert!(e.contains("line 1: empty file"), "{e}");
        let e = error(format!("{CSV_HEADER}\n0,R,18446744073709551615,4096,0\n"));
        assert!(e.contains("line 2") && e.contains("past byte 2^64 - 1"), "{e}");
        let e = error(format!("{CSV_HEADER}\n0,R,0,4096,0\n1,R,0,99999999999999,0\n"));
        assert!(e.contains("line 3") && e.contains("size_bytes 99999999999999"), "{e}");
        let e = error(format!("{CSV_HEADER}\n0,R,0,{},0\n", REQUEST_BYTES_MAX + 1));
        assert!(e.contains("line 2") && e.contains("largest request"), "{e}");
        let e = error(format!("{CSV_HEADER}\n{},R,0,1,0\n", TIMESTAMP_US_MAX + 1));
        assert!(e.contains("line 2: timestamp_us"), "{e}");
        let e = error(format!("{CSV_HEADER}\n0,R,0,1,{}\n", "7".repeat(LINE_BYTES_MAX)));
        assert!(e.contains("line 2: longer than"), "{e}");
        let mut text = format!("{CSV_HEADER}\n0,R,0,1,0\n").into_bytes();
        text.extend_from_slice(b"1,R,0,\xff,0\n");
        let e = Trace::parse("t.csv", "t", &text[..]).unwrap_err().to_string();
        assert!(e.contains("t.csv: line 3: not UTF-8"), "{e}");
        // At the limits: accepted, and the last byte of the address space is a block of its own.
        let edge = format!(
            "{CSV_HEADER}\n{TIMESTAMP_US_MAX},R,0,{REQUEST_BYTES_MAX},0\n0,R,18446744073709551615,1,0\n\
             0,R,18446744073709551615,0,0\n"
        );
        let t = Trace::parse("t.csv", "t", edge.as_bytes()).unwrap();
        assert_eq!(blocks_of(&t.accesses[1], 4096), blocks_of(&t.accesses[2], 4096));
        assert_eq!(t.footprint(4096), (REQUEST_BYTES_MAX / 4096) as usize + 1);
        t.check_blocks(Path::new("t.csv"), 1024).unwrap();
        // Many requests of the largest size: too much work to replay at 1 KiB blocks.
        let big = Access { size: REQUEST_BYTES_MAX, ..t.accesses[0] };
        let per = REQUEST_BYTES_MAX / 1024;
        let many = Trace { accesses: vec![big; (TRACE_BLOCKS_MAX / per + 1) as usize], ..t };
        let e = many.check_blocks(Path::new("t.csv"), 1024).unwrap_err().to_string();
        assert!(e.starts_with("t.csv: ") && e.contains("block touches at 1 KiB blocks"), "{e}");
        many.check_blocks(Path::new("t.csv"), 64 << 10).unwrap();
        let e = Trace::read(Path::new("/nonexistent/t.csv")).unwrap_err();
        assert!(std::error::Error::source(&e).is_none(), "the reason is in the message, once: {e}");
    }

    #[test]
    fn the_file_type_column_round_trips() {
        let text =
            format!("{CLIENT_CSV_HEADER}\n0,R,0,4096,7,image\n3,R,0,4096,9,database\n4,W,0,1,2,other\n");
        let t = Trace::parse("x", "x", text.as_bytes()).unwrap();
        let groups: Vec<Group> = t.accesses.iter().map(|a| a.group).collect();
        assert_eq!(groups, [Group::Image, Group::Database, Group::Other]);
        let path = std::env::temp_dir().join(format!("augur-typed-{}.csv.gz", std::process::id()));
        write_csv(&path, &t.accesses, false).unwrap();
        let back = Trace::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back.accesses, t.accesses);
        assert!(back.files, "a typed trace's streams are files");
        // Untyped accesses are written in the shared shape.
        let plain: Vec<Access> = t.accesses.iter().map(|a| Access { group: Group::Other, ..*a }).collect();
        write_csv(&path, &plain, true).unwrap();
        assert!(Trace::read(&path).unwrap().files, "a client trace stays one, all other or not");
        write_csv(&path, &plain, false).unwrap();
        let text = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let mut head = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&text[..]), &mut head).unwrap();
        assert!(head.starts_with(&format!("{CSV_HEADER}\n")), "{head}");
    }
}
