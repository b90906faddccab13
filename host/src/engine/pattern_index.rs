//! The peers by their topic patterns with wildcards, so that a publication finds the peers whose
//! patterns may match its topic by walking the topic's segments, not every such peer.
//!
//! A tree of segments: a pattern is stored along its segments, `*` as a branch of its own, and
//! ends either where its last segment ends or, for a last segment `>` (one or more remaining
//! segments), in the `>` ends of the branch before it. Looking up a topic follows, segment by
//! segment, the branch of that literal segment and the `*` branch, and collects the `>` ends
//! passed on the way and the ends reached where the topic ends.
//!
//! This is exactly [`crate::topics::matches`], for any pattern string, valid or not: a segment
//! such as `a*` is compared literally there and is a literal branch here. Callers check each
//! candidate's patterns with `matches` anyway, so the index only has to find every peer that
//! matches; the tests in `membership.rs` compare it with a walk under random changes.
//!
//! Cost: a lookup visits each branch of the tree at most once, and only branches along the
//! topic (for ordinary patterns, a path or two), so never more than the walk over every
//! pattern it replaces. Branches left empty by a removal are removed, so the tree holds what
//! the peers' records list, no more. Each pattern has a place of its own in the tree, so that
//! removing one pattern of a peer never removes another. Two kinds of pattern are kept aside
//! and matched one by one instead (only a peer that does not check its patterns sends them):
//! - one with `>` before its last segment, which `matches` ends at, so that `a.>` and `a.>.b`
//!   would share a place;
//! - one of more than [`MAX_TREE_SEGMENTS`] segments, which keeps the recursion of lookups and
//!   removals shallow whatever a record holds.

use comms_plugin_api::NodeId;
use std::collections::{BTreeSet, HashMap};

/// Patterns with more segments than this are not stored in the tree.
const MAX_TREE_SEGMENTS: usize = 32;

/// The wildcard patterns of the peers.
#[derive(Debug, Default)]
pub(super) struct PatternIndex {
    tree: Branch,
    /// The patterns kept aside ([`kept_aside`]), with their peer.
    aside: BTreeSet<(String, NodeId)>,
}

/// One segment position of the tree.
#[derive(Debug, Default)]
struct Branch {
    /// The patterns that continue with this literal segment.
    literal: HashMap<String, Branch>,
    /// The patterns that continue with `*`.
    any_one: Option<Box<Branch>>,
    /// The peers with a pattern that ends here with `>`: any one or more further segments.
    rest: BTreeSet<NodeId>,
    /// The peers with a pattern that ends here.
    ends: BTreeSet<NodeId>,
}

impl PatternIndex {
    /// Adds `id` under `pattern`.
    pub(super) fn insert(&mut self, pattern: &str, id: &NodeId) {
        if kept_aside(&pattern.split('.').collect::<Vec<_>>()) {
            self.aside.insert((pattern.to_string(), id.clone()));
            return;
        }
        let mut branch = &mut self.tree;
        for segment in pattern.split('.') {
            branch = match segment {
                ">" => {
                    branch.rest.insert(id.clone());
                    return;
                }
                "*" => branch.any_one.get_or_insert_with(Box::default),
                literal => branch.literal.entry(literal.to_string()).or_default(),
            };
        }
        branch.ends.insert(id.clone());
    }

    /// Removes `id` from under `pattern`, and the branches that leaves empty.
    pub(super) fn remove(&mut self, pattern: &str, id: &NodeId) {
        let segments: Vec<&str> = pattern.split('.').collect();
        if kept_aside(&segments) {
            self.aside.remove(&(pattern.to_string(), id.clone()));
            return;
        }
        self.tree.remove_along(&segments, id);
    }

    /// Whether no pattern is stored.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.tree.is_empty() && self.aside.is_empty()
    }

    /// Adds to `found` the peers with a pattern stored here that matches `topic`, and those
    /// with a pattern kept aside (the caller checks their patterns).
    pub(super) fn matching<'a>(&'a self, topic: &str, found: &mut BTreeSet<&'a NodeId>) {
        let segments: Vec<&str> = topic.split('.').collect();
        self.tree.matching_along(&segments, found);
        found.extend(self.aside.iter().map(|(_, id)| id));
    }
}

/// Whether a pattern of these segments is kept out of the tree (see the module's docs).
fn kept_aside(segments: &[&str]) -> bool {
    let before_last = &segments[..segments.len().saturating_sub(1)];
    segments.len() > MAX_TREE_SEGMENTS || before_last.contains(&">")
}

impl Branch {
    fn remove_along(&mut self, segments: &[&str], id: &NodeId) {
        let Some((first, rest)) = segments.split_first() else {
            self.ends.remove(id);
            return;
        };
        match *first {
            ">" => {
                self.rest.remove(id);
            }
            "*" => {
                if let Some(child) = self.any_one.as_mut() {
                    child.remove_along(rest, id);
                    if child.is_empty() {
                        self.any_one = None;
                    }
                }
            }
            literal => {
                if let Some(child) = self.literal.get_mut(literal) {
                    child.remove_along(rest, id);
                    if child.is_empty() {
                        self.literal.remove(literal);
                    }
                }
            }
        }
    }

    /// Whether nothing is stored here or below (branches below are never left empty).
    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.any_one.is_none() && self.rest.is_empty() && self.ends.is_empty()
    }

    /// Recurses no deeper than the tree ([`MAX_TREE_SEGMENTS`] levels), however long the topic.
    fn matching_along<'a>(&'a self, segments: &[&str], found: &mut BTreeSet<&'a NodeId>) {
        let Some((first, rest)) = segments.split_first() else {
            found.extend(&self.ends);
            return;
        };
        found.extend(&self.rest);
        if let Some(child) = self.literal.get(*first) {
            child.matching_along(rest, found);
        }
        if let Some(child) = &self.any_one {
            child.matching_along(rest, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topics::matches;

    fn found(index: &PatternIndex, topic: &str) -> Vec<String> {
        let mut found = BTreeSet::new();
        index.matching(topic, &mut found);
        found.into_iter().map(|id| id.as_str().to_string()).collect()
    }

    /// Every pattern under its own id, looked up with every topic: the index finds exactly the
    /// patterns `matches` accepts, invalid patterns included, and those kept aside (`a.>.c`)
    /// whatever the topic.
    #[test]
    fn finds_exactly_what_matches_accepts() {
        let patterns = [
            "a", "a.b", "a.*", "a.>", "*", ">", "*.b", "*.*", "a.*.c", "a.>.c", "a*", "a..b", "*.>", "b.c.>",
        ];
        let topics =
            ["a", "b", "a.b", "a.c", "a.b.c", "a.x.c", "b.b", "b.c", "b.c.d", "a*", "a..b", "x.y.z.w"];
        let mut index = PatternIndex::default();
        for pattern in patterns {
            index.insert(pattern, &NodeId::new(pattern));
        }
        for topic in topics {
            let mut expected: Vec<String> = patterns
                .iter()
                .filter(|pattern| matches(pattern, topic) || **pattern == "a.>.c")
                .map(|p| p.to_string())
                .collect();
            expected.sort();
            assert_eq!(found(&index, topic), expected, "topic {topic}");
        }
    }

    /// A pattern too long for the tree is found for every topic (the caller checks it) until
    /// it is removed.
    #[test]
    fn a_pattern_of_many_segments_is_kept_aside() {
        let long = vec!["*"; MAX_TREE_SEGMENTS + 1].join(".");
        let short = vec!["*"; MAX_TREE_SEGMENTS].join(".");
        let mut index = PatternIndex::default();
        index.insert(&long, &NodeId::new("prober"));
        index.insert(&short, &NodeId::new("deep"));
        assert_eq!(found(&index, "a"), ["prober"]);
        assert_eq!(found(&index, &vec!["a"; MAX_TREE_SEGMENTS].join(".")), ["deep", "prober"]);
        index.remove(&long, &NodeId::new("prober"));
        index.remove(&short, &NodeId::new("deep"));
        assert!(index.is_empty(), "{index:?}");
    }

    /// `a.>.b` (invalid: `>` before the end) matches what `a.>` matches; removing one of them
    /// from a peer that lists both leaves the other.
    #[test]
    fn a_pattern_with_an_early_tail_wildcard_does_not_share_a_place() {
        let (peer, other) = (NodeId::new("peer"), NodeId::new("other"));
        for (keep, drop) in [("a.>", "a.>.b"), ("a.>.b", "a.>")] {
            let mut index = PatternIndex::default();
            index.insert(keep, &peer);
            index.insert(drop, &peer);
            index.insert("a.>", &other);
            index.remove(drop, &peer);
            assert_eq!(found(&index, "a.x"), ["other", "peer"], "{keep} kept, {drop} removed");
        }
    }

    #[test]
    fn removing_every_pattern_leaves_an_empty_tree() {
        let mut index = PatternIndex::default();
        let (alice, bob) = (NodeId::new("alice"), NodeId::new("bob"));
        for pattern in ["orders.*.created", "orders.>", "*.audit", "orders.*.created"] {
            index.insert(pattern, &alice);
        }
        index.insert("orders.*.created", &bob);
        index.remove("orders.*.created", &alice);
        assert_eq!(found(&index, "orders.eu.created"), ["alice", "bob"], "alice still has `orders.>`");
        index.remove("orders.>", &alice);
        assert_eq!(found(&index, "orders.eu.created"), ["bob"]);
        index.remove("orders.*.created", &bob);
        index.remove("*.audit", &alice);
        index.remove("never.stored", &alice);
        assert!(index.is_empty(), "{index:?}");
    }
}
