//! Shard placement as a pure function: which nodes hold each shard of a volume.
//!
//! Each node gets a score: a weighted sum of its free capacity, its performance class and how
//! idle it is, minus a penalty for every replica it already holds (so shards spread). Replicas
//! of a shard go to distinct nodes and, when the candidates span enough zones, distinct zones.
//! The best-scoring replica is the primary. Ties break by node id, so the result is a function
//! of the inputs alone.

use std::collections::HashSet;

use augur_proto::NodeId;
use augur_proto::meta::PerfClass;

/// Weight of free capacity (free / capacity) in a node's score.
pub const WEIGHT_FREE: f64 = 0.4;
/// Weight of the performance class (hdd 0, ssd 0.5, nvme 1).
pub const WEIGHT_CLASS: f64 = 0.2;
/// Weight of idleness (1 - iops / busiest iops).
pub const WEIGHT_IDLE: f64 = 0.2;
/// Score lost per replica a node already holds, relative to the mean per node.
pub const WEIGHT_SPREAD: f64 = 1.0;

/// A live storage node that may receive replicas.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub node: NodeId,
    pub zone: Option<String>,
    pub perf_class: PerfClass,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    /// Read + write operations per second, from heartbeats.
    pub iops: u64,
    /// Replicas it holds already (of any volume).
    pub replicas_held: u32,
}

/// One shard's replicas (first = primary) and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Placed {
    pub nodes: Vec<NodeId>,
    pub explain: String,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    #[error("{replicas} replicas need {replicas} live storage nodes with free space; {available} available")]
    NotEnoughNodes { replicas: usize, available: usize },
}

fn class_score(c: PerfClass) -> f64 {
    match c {
        PerfClass::Hdd => 0.0,
        PerfClass::Ssd => 0.5,
        PerfClass::Nvme => 1.0,
    }
}

/// The score of a candidate before the spread penalty.
pub fn base_score(c: &Candidate, busiest_iops: u64) -> f64 {
    let free = if c.capacity_bytes == 0 {
        0.0
    } else {
        c.capacity_bytes.saturating_sub(c.used_bytes) as f64 / c.capacity_bytes as f64
    };
    let idle = if busiest_iops == 0 { 1.0 } else { 1.0 - c.iops as f64 / busiest_iops as f64 };
    WEIGHT_FREE * free + WEIGHT_CLASS * class_score(c.perf_class) + WEIGHT_IDLE * idle
}

/// Places `shard_count` shards with `replicas` replicas each.
pub fn place(candidates: &[Candidate], replicas: usize, shard_count: u32) -> Result<Vec<Placed>, PlaceError> {
    let usable: Vec<&Candidate> = candidates.iter().filter(|c| c.capacity_bytes > c.used_bytes).collect();
    if usable.len() < replicas || replicas == 0 {
        return Err(PlaceError::NotEnoughNodes { replicas, available: usable.len() });
    }
    let busiest = usable.iter().map(|c| c.iops).max().unwrap_or(0);
    let base: Vec<f64> = usable.iter().map(|c| base_score(c, busiest)).collect();
    let mut held: Vec<f64> = usable.iter().map(|c| f64::from(c.replicas_held)).collect();
    let zones: HashSet<&str> = usable.iter().filter_map(|c| c.zone.as_deref()).collect();
    let spread_zones = zones.len() >= replicas && usable.iter().all(|c| c.zone.is_some());
    let mut out = Vec::with_capacity(shard_count as usize);
    for _ in 0..shard_count {
        let mean = (held.iter().sum::<f64>() / held.len() as f64).max(1.0);
        let mut chosen: Vec<usize> = Vec::with_capacity(replicas);
        let mut used_zones: HashSet<&str> = HashSet::new();
        for _ in 0..replicas {
            let best = (0..usable.len())
                .filter(|i| !chosen.contains(i))
                .filter(|i| !spread_zones || !used_zones.contains(usable[*i].zone.as_deref().unwrap_or("")))
                .map(|i| (base[i] - WEIGHT_SPREAD * held[i] / mean, i))
                .max_by(|a, b| a.0.total_cmp(&b.0).then(usable[b.1].node.cmp(&usable[a.1].node)))
                .map(|(_, i)| i)
                .expect("enough candidates were checked above");
            chosen.push(best);
            if let Some(z) = usable[best].zone.as_deref() {
                used_zones.insert(z);
            }
        }
        // The primary carries the write load: count it a little heavier.
        for (rank, &i) in chosen.iter().enumerate() {
            held[i] += if rank == 0 { 1.5 } else { 1.0 };
        }
        let explain = chosen
            .iter()
            .enumerate()
            .map(|(rank, &i)| {
                let c = usable[i];
                format!(
                    "{}{} (score {:.2}: free {:.0}%, {}, {} iops{})",
                    if rank == 0 { "primary " } else { "" },
                    c.node,
                    base[i],
                    100.0 * c.capacity_bytes.saturating_sub(c.used_bytes) as f64 / c.capacity_bytes as f64,
                    c.perf_class,
                    c.iops,
                    c.zone.as_deref().map(|z| format!(", zone {z}")).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        out.push(Placed { nodes: chosen.iter().map(|&i| usable[i].node).collect(), explain });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cand(node: u64, zone: Option<&str>, free_pct: u64, class: PerfClass, iops: u64) -> Candidate {
        Candidate {
            node: NodeId(node),
            zone: zone.map(str::to_string),
            perf_class: class,
            capacity_bytes: 1000,
            used_bytes: 1000 - free_pct * 10,
            iops,
            replicas_held: 0,
        }
    }

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        any::<bool>().prop_flat_map(candidates_zoned)
    }

    /// Candidates that all carry a zone, or none does.
    fn candidates_zoned(zoned: bool) -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::vec((0u8..4, 0u64..=100, 0u8..3, 0u64..10_000, 0u32..50), 1..12).prop_map(
            move |v| {
                v.into_iter()
                    .enumerate()
                    .map(|(i, (z, free, class, iops, held))| Candidate {
                        node: NodeId(i as u64 + 1),
                        zone: zoned.then(|| format!("z{z}")),
                        perf_class: [PerfClass::Hdd, PerfClass::Ssd, PerfClass::Nvme][class as usize],
                        capacity_bytes: 100,
                        used_bytes: 100 - free,
                        iops,
                        replicas_held: held,
                    })
                    .collect()
            },
        )
    }

    proptest! {
        #[test]
        fn replicas_are_distinct_live_nodes_with_space(cs in candidates(), r in 1usize..5, n in 1u32..64) {
            match place(&cs, r, n) {
                Ok(placed) => {
                    prop_assert_eq!(placed.len(), n as usize);
                    for p in &placed {
                        prop_assert_eq!(p.nodes.len(), r);
                        let set: HashSet<_> = p.nodes.iter().collect();
                        prop_assert_eq!(set.len(), r, "replicas on distinct nodes");
                        for node in &p.nodes {
                            let c = cs.iter().find(|c| c.node == *node).unwrap();
                            prop_assert!(c.capacity_bytes > c.used_bytes, "no full node");
                        }
                    }
                }
                Err(PlaceError::NotEnoughNodes { available, .. }) => {
                    prop_assert!(available < r);
                    prop_assert_eq!(available, cs.iter().filter(|c| c.capacity_bytes > c.used_bytes).count());
                }
            }
        }

        #[test]
        fn zones_are_distinct_when_there_are_enough(cs in candidates_zoned(true), r in 1usize..4, n in 1u32..32) {
            let usable: Vec<_> = cs.iter().filter(|c| c.capacity_bytes > c.used_bytes).collect();
            let zones: HashSet<_> = usable.iter().filter_map(|c| c.zone.clone()).collect();
            prop_assume!(zones.len() >= r);
            for p in place(&cs, r, n).unwrap() {
                let z: HashSet<_> = p.nodes.iter().map(|n| cs.iter().find(|c| c.node == *n).unwrap().zone.clone()).collect();
                prop_assert_eq!(z.len(), r);
            }
        }

        #[test]
        fn placement_is_a_function_of_its_inputs(cs in candidates(), r in 1usize..4, n in 1u32..32) {
            prop_assert_eq!(place(&cs, r, n).ok(), place(&cs, r, n).ok());
        }
    }

    #[test]
    fn equal_nodes_share_shards_and_primaries_evenly() {
        let cs: Vec<_> = (1..=4).map(|i| cand(i, None, 50, PerfClass::Ssd, 0)).collect();
        let placed = place(&cs, 3, 64).unwrap();
        for node in 1..=4 {
            let held = placed.iter().filter(|p| p.nodes.contains(&NodeId(node))).count();
            let primary = placed.iter().filter(|p| p.nodes[0] == NodeId(node)).count();
            assert!((44..=52).contains(&held), "node {node} holds {held} of 192 replicas");
            assert!((12..=20).contains(&primary), "node {node} is primary of {primary} of 64");
        }
    }

    #[test]
    fn better_nodes_get_more_but_not_all() {
        let cs = vec![
            cand(1, None, 90, PerfClass::Nvme, 0),
            cand(2, None, 10, PerfClass::Hdd, 5000),
            cand(3, None, 50, PerfClass::Ssd, 100),
            cand(4, None, 50, PerfClass::Ssd, 100),
        ];
        let placed = place(&cs, 1, 100).unwrap();
        let count = |n| placed.iter().filter(|p| p.nodes[0] == NodeId(n)).count();
        assert!(count(1) > count(3) && count(3) > count(2), "{} {} {}", count(1), count(3), count(2));
        assert!(count(2) > 0, "even the weakest node gets some shards");
    }

    #[test]
    fn too_few_nodes_is_an_error_naming_the_numbers() {
        let cs = vec![cand(1, None, 50, PerfClass::Ssd, 0), cand(2, None, 0, PerfClass::Ssd, 0)];
        let e = place(&cs, 2, 4).unwrap_err();
        assert_eq!(e, PlaceError::NotEnoughNodes { replicas: 2, available: 1 });
        assert!(e.to_string().contains("1 available"));
    }
}
