//! Which shards this node holds, at which epoch: the check every block request passes first.
//! A pure table; persistence is the store's job.

use std::collections::HashMap;

use augur_proto::msg::{
    BLOCK_SIZE_MAX_BYTES, BLOCK_SIZE_MIN_BYTES, ShardPlacement, ShardStatus, VolumeLayout,
};
use augur_proto::{ErrorCode, NodeId, ShardId, ShardRef, VolumeId, WireError};

#[derive(Clone, Debug, Default)]
pub struct PlacementTable {
    layouts: HashMap<VolumeId, VolumeLayout>,
    shards: HashMap<(VolumeId, ShardId), ShardPlacement>,
}

impl PlacementTable {
    /// Checks that `shard` is held here at exactly the request's epoch; returns the volume's
    /// block size.
    pub fn check(&self, me: NodeId, shard: ShardRef) -> Result<u32, WireError> {
        let placement = self.shards.get(&(shard.volume, shard.shard)).ok_or_else(|| {
            WireError::new(
                ErrorCode::ShardNotHere,
                format!("{} has no placement for {}/{}", me, shard.volume, shard.shard),
            )
        })?;
        if shard.epoch < placement.epoch {
            return Err(WireError::new(
                ErrorCode::StaleEpoch { current: placement.epoch },
                format!("request for {shard} but the shard is at {}", placement.epoch),
            ));
        }
        if shard.epoch > placement.epoch {
            return Err(WireError::new(
                ErrorCode::EpochAhead { current: placement.epoch },
                format!("request for {shard} but {me} knows only {}", placement.epoch),
            ));
        }
        if !placement.replicas.iter().any(|r| r.node == me) {
            return Err(WireError::new(ErrorCode::ShardNotHere, format!("{me} is not a replica of {shard}")));
        }
        let layout = self.layouts.get(&shard.volume).ok_or_else(|| {
            WireError::new(ErrorCode::Internal, format!("placement for {shard} without a volume layout"))
        })?;
        Ok(layout.block_size_bytes)
    }

    /// Validates a placement update without applying it. Epochs never go backwards, a volume's
    /// block size never changes, and an epoch names exactly one replica list.
    pub fn validate(&self, layout: &VolumeLayout, shards: &[ShardPlacement]) -> Result<(), WireError> {
        let invalid = |msg: String| Err(WireError::new(ErrorCode::InvalidArgument, msg));
        let bs = layout.block_size_bytes;
        if !(BLOCK_SIZE_MIN_BYTES..=BLOCK_SIZE_MAX_BYTES).contains(&bs) || !bs.is_power_of_two() {
            return invalid(format!(
                "block size {bs} is not a power of two between {BLOCK_SIZE_MIN_BYTES} and {BLOCK_SIZE_MAX_BYTES}"
            ));
        }
        if let Some(old) = self.layouts.get(&layout.volume).filter(|old| old.block_size_bytes != bs) {
            return invalid(format!(
                "{} has block size {}; it cannot change to {bs}",
                layout.volume, old.block_size_bytes
            ));
        }
        for new in shards {
            if let Some(old) = self.shards.get(&(layout.volume, new.shard)) {
                if new.epoch < old.epoch {
                    return invalid(format!(
                        "{}/{} is at {}; refusing to go back to {}",
                        layout.volume, new.shard, old.epoch, new.epoch
                    ));
                }
                if new.epoch == old.epoch && new.replicas != old.replicas {
                    return invalid(format!(
                        "{}/{} at {} already has another replica list; a change needs a new epoch",
                        layout.volume, new.shard, new.epoch
                    ));
                }
            }
        }
        Ok(())
    }

    /// Applies an update that `validate` accepted.
    pub fn apply(&mut self, layout: VolumeLayout, shards: Vec<ShardPlacement>) {
        for shard in shards {
            self.shards.insert((layout.volume, shard.shard), shard);
        }
        self.layouts.insert(layout.volume, layout);
    }

    /// Replaces the whole table with the meta group's assignment. A shard whose new epoch is
    /// older than the one held (an answer from a lagging leader) keeps what it has. Returns the
    /// table as it now is, for persisting.
    pub fn replace_all(
        &mut self,
        assignments: Vec<(VolumeLayout, Vec<ShardPlacement>)>,
    ) -> Vec<(VolumeLayout, Vec<ShardPlacement>)> {
        let mut layouts = HashMap::new();
        let mut shards = HashMap::new();
        for (layout, list) in assignments {
            layouts.insert(layout.volume, layout);
            for new in list {
                let k = (layout.volume, new.shard);
                let keep = self.shards.get(&k).filter(|old| old.epoch > new.epoch).cloned();
                shards.insert(k, keep.unwrap_or(new));
            }
        }
        self.layouts = layouts;
        self.shards = shards;
        self.snapshot()
    }

    /// Every layout with its shards.
    pub fn snapshot(&self) -> Vec<(VolumeLayout, Vec<ShardPlacement>)> {
        let mut out: Vec<(VolumeLayout, Vec<ShardPlacement>)> = self
            .layouts
            .values()
            .map(|l| {
                let mut list: Vec<ShardPlacement> =
                    self.shards.iter().filter(|((v, _), _)| *v == l.volume).map(|(_, p)| p.clone()).collect();
                list.sort_by_key(|p| p.shard);
                (*l, list)
            })
            .collect();
        out.sort_by_key(|(l, _)| l.volume);
        out
    }

    /// The placement of one shard, if held.
    pub fn get(&self, volume: VolumeId, shard: ShardId) -> Option<&ShardPlacement> {
        self.shards.get(&(volume, shard))
    }

    pub fn status(&self, me: NodeId) -> Vec<ShardStatus> {
        let mut out: Vec<ShardStatus> = self
            .shards
            .iter()
            .filter(|(_, p)| p.replicas.iter().any(|r| r.node == me))
            .map(|((volume, shard), p)| ShardStatus {
                volume: *volume,
                shard: *shard,
                epoch: p.epoch,
                is_primary: p.replicas.first().is_some_and(|r| r.node == me),
            })
            .collect();
        out.sort_by_key(|s| (s.volume, s.shard));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use augur_proto::Epoch;
    use augur_proto::msg::Replica;

    fn placement(epoch: u64, nodes: &[u64]) -> ShardPlacement {
        ShardPlacement {
            shard: ShardId(0),
            epoch: Epoch(epoch),
            replicas: nodes
                .iter()
                .map(|n| Replica { node: NodeId(*n), addr: format!("127.0.0.{n}:1") })
                .collect(),
        }
    }

    #[test]
    fn epochs_are_checked_both_ways() {
        let layout = VolumeLayout { volume: VolumeId(1), block_size_bytes: 65536 };
        let mut t = PlacementTable::default();
        t.validate(&layout, &[placement(2, &[1, 2])]).unwrap();
        t.apply(layout, vec![placement(2, &[1, 2])]);
        let r = |e| ShardRef { volume: VolumeId(1), shard: ShardId(0), epoch: Epoch(e) };
        assert_eq!(t.check(NodeId(1), r(2)).unwrap(), 65536);
        assert_eq!(t.check(NodeId(1), r(1)).unwrap_err().code, ErrorCode::StaleEpoch { current: Epoch(2) });
        assert_eq!(t.check(NodeId(1), r(3)).unwrap_err().code, ErrorCode::EpochAhead { current: Epoch(2) });
        assert_eq!(t.check(NodeId(3), r(2)).unwrap_err().code, ErrorCode::ShardNotHere);
        let other = ShardRef { shard: ShardId(5), ..r(2) };
        assert_eq!(t.check(NodeId(1), other).unwrap_err().code, ErrorCode::ShardNotHere);
    }

    #[test]
    fn regressions_and_silent_changes_are_refused() {
        let layout = VolumeLayout { volume: VolumeId(1), block_size_bytes: 65536 };
        let mut t = PlacementTable::default();
        t.apply(layout, vec![placement(2, &[1, 2])]);
        assert!(t.validate(&layout, &[placement(1, &[1])]).is_err());
        assert!(t.validate(&layout, &[placement(2, &[1])]).is_err());
        t.validate(&layout, &[placement(2, &[1, 2])]).unwrap();
        t.validate(&layout, &[placement(3, &[2])]).unwrap();
        let resized = VolumeLayout { block_size_bytes: 4096, ..layout };
        assert!(t.validate(&resized, &[]).is_err());
        let odd = VolumeLayout { volume: VolumeId(2), block_size_bytes: 5000 };
        assert!(t.validate(&odd, &[]).unwrap_err().message.contains("5000"));
    }
}
