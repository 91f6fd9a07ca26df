//! The client's own access trace (`augur mount --trace FILE`): every read and write request the
//! kernel sends, in the shared CSV shape with the file's inode as the stream and the file's type
//! group as a sixth column (`prefetch::trace::CLIENT_CSV_HEADER`), so `augur trace
//! eval|convert|features` and training read it like any other trace.
//!
//! Recording never blocks a request: records go through a queue of `TRACE_QUEUE_MAX` entries to
//! a writer thread, which flushes whenever the queue runs empty; a record that finds the queue
//! full is dropped and counted (logged when the recorder stops, and every `DROP_LOG_EVERY`).
//! Dropping the recorder waits for the writer to put every queued record on disk.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::Instant;

use augur_prefetch::filetype::Group;
use augur_prefetch::trace::{Access, CLIENT_CSV_HEADER, Op, write_record};

/// Records queued for the writer thread at most.
pub const TRACE_QUEUE_MAX: usize = 65_536;
/// A warning every this many dropped records.
const DROP_LOG_EVERY: u64 = 10_000;

pub struct TraceRecorder {
    /// None once dropping (closing the queue ends the writer).
    tx: Option<SyncSender<Access>>,
    writer: Option<std::thread::JoinHandle<()>>,
    started: Instant,
    dropped: AtomicU64,
}

impl TraceRecorder {
    /// Creates (truncates) `path`, writes the header and starts the writer thread.
    pub fn create(path: &Path) -> std::io::Result<TraceRecorder> {
        let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
        writeln!(w, "{CLIENT_CSV_HEADER}")?;
        w.flush()?;
        let (tx, rx) = sync_channel(TRACE_QUEUE_MAX);
        let shown = path.display().to_string();
        let writer = std::thread::Builder::new().name("augur-trace".into()).spawn(move || {
            if let Err(e) = write_records(rx, &mut w) {
                tracing::error!("trace {shown}: {e}; recording stopped");
            }
        })?;
        Ok(TraceRecorder {
            tx: Some(tx),
            writer: Some(writer),
            started: Instant::now(),
            dropped: AtomicU64::new(0),
        })
    }

    /// Records one request of `size` bytes at `offset` of inode `ino`, a file of `group`.
    pub fn record(&self, op: Op, offset: u64, size: u64, ino: u64, group: Group) {
        let t_us = self.started.elapsed().as_micros() as u64;
        let Some(tx) = &self.tx else { return };
        match tx.try_send(Access { t_us, op, offset, size, stream: ino, group }) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n % DROP_LOG_EVERY == 1 {
                    tracing::warn!("trace queue full ({TRACE_QUEUE_MAX}): {n} records dropped so far");
                }
            }
        }
    }
}

impl Drop for TraceRecorder {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(w) = self.writer.take()
            && w.join().is_err()
        {
            tracing::error!("trace writer panicked; the trace may end early");
        }
        let n = self.dropped.load(Ordering::Relaxed);
        if n > 0 {
            tracing::warn!("trace: {n} records dropped (queue of {TRACE_QUEUE_MAX} full)");
        }
    }
}

fn write_records(rx: Receiver<Access>, w: &mut impl Write) -> std::io::Result<()> {
    loop {
        let r = match rx.try_recv() {
            Ok(r) => r,
            Err(TryRecvError::Empty) => {
                // Idle: what was recorded so far is on disk.
                w.flush()?;
                match rx.recv() {
                    Ok(r) => r,
                    Err(_) => return w.flush(),
                }
            }
            Err(TryRecvError::Disconnected) => return w.flush(),
        };
        write_record(w, &r, true)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queued_record_is_on_disk_once_the_recorder_is_dropped() {
        let path = std::env::temp_dir().join(format!("augur-trace-test-{}.csv", std::process::id()));
        let rec = TraceRecorder::create(&path).unwrap();
        let n = 20_000u64;
        for i in 0..n {
            let group = if i % 3 == 0 { Group::Image } else { Group::Other };
            rec.record(if i % 2 == 0 { Op::Read } else { Op::Write }, i * 4096, 4096, 7, group);
        }
        let dropped = rec.dropped.load(Ordering::Relaxed);
        drop(rec);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], CLIENT_CSV_HEADER);
        assert_eq!(lines.len() as u64, 1 + n - dropped, "no record lost but those counted as dropped");
        assert!(lines.last().unwrap().ends_with(&format!(",W,{},4096,7,other", (n - 1) * 4096)));
        let t = augur_prefetch::Trace::read(&path).unwrap();
        assert_eq!(t.accesses.len() as u64, n - dropped);
        if dropped == 0 {
            assert_eq!(t.accesses[3].group, Group::Image);
        }
        std::fs::remove_file(&path).unwrap();
    }
}
