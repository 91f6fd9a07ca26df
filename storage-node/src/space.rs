//! Free-space watch of the data directory's file system.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::StoreError;

/// Free space is measured at most this often; writes in between use the last figure.
const SPACE_REFRESH: Duration = Duration::from_millis(500);

pub struct SpaceMonitor {
    dir: PathBuf,
    reserve_bytes: u64,
    /// (when measured, capacity, free)
    last: Mutex<(Option<Instant>, u64, u64)>,
}

impl SpaceMonitor {
    pub fn new(dir: PathBuf, reserve_bytes: u64) -> Self {
        Self { dir, reserve_bytes, last: Mutex::new((None, 0, 0)) }
    }

    /// Measures now: (capacity, free) in bytes.
    pub fn refresh(&self) -> (u64, u64) {
        let (capacity, free) = match nix::sys::statvfs::statvfs(&self.dir) {
            Ok(st) => {
                let frag = st.fragment_size();
                (st.blocks() * frag, st.blocks_available() * frag)
            }
            // Unknown is reported as full rather than guessed as empty.
            Err(_) => (0, 0),
        };
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = (Some(Instant::now()), capacity, free);
        (capacity, free)
    }

    /// Refuses a write of `bytes` that would take free space below the reserve.
    pub fn check_room(&self, bytes: u64) -> Result<(), StoreError> {
        let cached = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        let free = match cached {
            (Some(at), _, free) if at.elapsed() < SPACE_REFRESH => free,
            _ => self.refresh().1,
        };
        if free < self.reserve_bytes.saturating_add(bytes) {
            return Err(StoreError::NoSpace);
        }
        Ok(())
    }
}
