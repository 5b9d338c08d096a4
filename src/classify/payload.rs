//! Payload signatures: recognising IM protocols from the first bytes of a tunnel.
//!
//! This module owns three things:
//!
//! * **The signature model.** A [`PayloadRule`] is a conjunction of [`Atom`]s, each a
//!   byte string that must occur either at a fixed offset ([`Anchor::At`]) or anywhere
//!   so that it ends within the first `n` bytes ([`Anchor::Within`]), optionally with
//!   ASCII case folding. A rule applies to one [`Direction`] of a tunnel.
//! * **The matcher.** [`PayloadMatcher::compile`] turns the floating (`Within`) atoms
//!   of the rules of a direction into Aho-Corasick automata (DFAs from the
//!   `aho-corasick` crate); anchored (`At`) atoms are plain slice comparisons at their
//!   offset, cheaper than finding them anywhere and filtering hits by offset, and the
//!   rules are found from the bytes at those offsets through an index.
//!   [`PayloadMatcher::classify`] never allocates: its per-call state is bitsets of
//!   rules and patterns on the stack and a per-thread table of the end of the first
//!   occurrence of each pattern, of which a call clears only what it set.
//! * **The hold/forward contract.** While some rule could still match,
//!   [`Outcome::Pending`] says how many leading bytes may already go to the other side
//!   without any atom of a later match ever having been sent, so ordinary protocols
//!   flow promptly and a signature never leaks to the upstream in pieces.
//!
//! It leaves to others: loading rules from signature files and mapping `tag`s to
//! applications and descriptions (the caller's tables), buffering a direction up to
//! the inspection window and remembering how much was already forwarded, timeouts for
//! streams that stall while held, and the blocking decision itself.
//!
//! # Semantics
//!
//! * A rule **matches** when every atom holds in the buffer. Among matching rules the
//!   one whose completing atom (the one that ends last; among those, the one that
//!   starts last) ends earliest wins, then the lowest tag. That rule is fixed at the
//!   first prefix of the stream at which any rule matches, so the answer does not
//!   depend on how the stream was split into reads.
//! * A rule is **alive** while no atom has failed for good: every `At` atom agrees with
//!   the bytes present at its offset (fully or partly), and every `Within(n)` atom not
//!   yet found still has room (`buf.len() < n`). With no rule alive the answer is
//!   [`Outcome::NoMatch`], and it stays so for any longer buffer.
//! * If an alive rule has made **progress** (one of its `Within` atoms was found, or
//!   the buffer reaches the offset of one of its `At` atoms), everything is held:
//!   `Pending { forward_upto: 0 }`. Otherwise only the longest suffix of the buffer
//!   that is a proper prefix of a `Within` atom of an alive rule (and could still end
//!   within that atom's bound) is held.
//!
//! `forward_upto` is computed from the buffer alone, so it can shrink from one call to
//! the next (a stream that starts looking like a protocol gets held): the caller
//! forwards `buf[sent..forward_upto]` only when `forward_upto > sent`. With that
//! reading, no byte of an atom that takes part in a later match has been forwarded.
//!
//! # Search
//!
//! Most signatures start with protocol magic at a fixed offset, and the cost of a call
//! must not grow with their number. So a rule with anchored atoms is looked up by the
//! first bytes of its first anchored atom (`AnchorIndex`: one binary search per
//! distinct offset, key length and case handling) and then checked in full; rules
//! without anchored atoms are always in play. Floating patterns used by some rule
//! without anchored atoms ("free" patterns) have an automaton of their own; the
//! patterns of the other rules ("gated") only matter once that rule's anchored atoms
//! agree with the buffer, and are then looked for one by one, or, when more than a
//! few such atoms are in play, by the automaton over every pattern.
//!
//! Only the part of the buffer that rules still in play can reach is searched
//! (`min(buf.len(), max Within bound)` over the rules whose anchored atoms agree), so
//! a TLS stream, say, costs the first kilobyte and not the whole window. Walking a DFA
//! over every byte, as `find_overlapping_iter` does, is a chain of dependent table
//! loads (0.37 GB/s with 60 rules on the development machine); so when every floating
//! pattern has at least 2 bytes a q-gram filter (see `SearchMode::Grams`) tests only
//! every few positions, independently of each other, and the DFA, started anchored,
//! checks just the positions where a pattern may start. A direction with a one-byte
//! floating pattern falls back to the plain overlapping walk. Either way every
//! occurrence is found, and only the earliest end of each pattern is kept.
//!
//! # Case folding
//!
//! `nocase` atoms need an ASCII case-insensitive automaton, and the builder applies
//! that setting to all of its patterns. Rather than keep two automata (two searches
//! over the buffer), a direction with any `nocase` floating atom gets one
//! case-insensitive automaton, and hits of case-sensitive patterns are compared byte
//! for byte afterwards. The extra hits only come from case variants of a
//! case-sensitive pattern, which are rare, and the check is a short comparison. The
//! q-gram tables of such an automaton are keyed by lowercased q-grams.

use std::collections::HashMap;
use std::sync::OnceLock;

use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::dfa::DFA;
use aho_corasick::{Anchored, MatchKind, StartKind};

/// Which way the bytes of a tunnel travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client-to-upstream bytes.
    Client,
    /// Upstream-to-client bytes.
    Server,
}

/// Where an atom must occur.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// The pattern starts exactly at this offset.
    At(usize),
    /// The pattern occurs anywhere so that it ends at or before byte `n`.
    Within(usize),
}

/// One byte pattern of a rule and where it must occur.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Atom {
    pub bytes: Vec<u8>,
    pub anchor: Anchor,
    /// Compare with ASCII case folding.
    pub nocase: bool,
}

/// A payload signature: all of its atoms must hold in one direction of a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadRule {
    /// Opaque tag the caller uses to find the app and rule description (index into its tables).
    pub tag: u32,
    pub direction: Direction,
    /// All must hold. Non-empty; each atom's bytes non-empty.
    pub atoms: Vec<Atom>,
}

/// The verdict on the bytes of one direction received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Rule `tag` matched; `offset` = start offset of the atom that completed the match.
    Match { tag: u32, offset: usize },
    /// Some rule could still match with more bytes. Bytes `buf[..forward_upto]` can be
    /// forwarded now: no later match can involve them.
    Pending { forward_upto: usize },
    /// No rule can match any more, whatever follows.
    NoMatch,
}

/// Most atoms one rule may have (a sanity bound: completion checks are per atom).
const MAX_ATOMS_PER_RULE: usize = 64;
/// Most rules one direction may have (size of the per-call rule bitset).
const MAX_RULES_PER_DIRECTION: usize = 4096;
/// Most distinct floating patterns one direction may have (size of the per-call table).
const MAX_PATTERNS_PER_DIRECTION: usize = 4096;
const RULE_WORDS: usize = MAX_RULES_PER_DIRECTION / 64;
/// Most gated floating atoms looked for one by one (see
/// [`DirectionMatcher::find_floating`]).
const MAX_GATED_SEARCHES: usize = 16;
/// `first_end` value of a pattern not (yet) found.
const NOT_FOUND: u32 = u32::MAX;

thread_local! {
    /// The end of the first occurrence of each floating pattern (by pattern index),
    /// [`NOT_FOUND`] between calls (see [`DirectionMatcher::classify`]).
    static FIRST_END: std::cell::RefCell<[u32; MAX_PATTERNS_PER_DIRECTION]> =
        const { std::cell::RefCell::new([NOT_FOUND; MAX_PATTERNS_PER_DIRECTION]) };
}

/// All rules, compiled: one automaton per direction.
pub struct PayloadMatcher {
    client: DirectionMatcher,
    server: DirectionMatcher,
}

/// The rules of one direction.
struct DirectionMatcher {
    /// Finds all floating patterns; `None` when the direction has none.
    search: Option<PatternSearch>,
    /// Finds the free floating patterns (see [`Pattern::free`]); `None` when the
    /// direction has none.
    free_search: Option<PatternSearch>,
    /// Distinct floating patterns.
    patterns: Vec<Pattern>,
    rules: Vec<CompiledRule>,
    /// Finds the rules whose anchored atoms may agree with a buffer.
    index: AnchorIndex,
    /// (smallest floating bound, rule index) of each rule without anchored atoms,
    /// largest bound first. Such a rule none of whose patterns was found is alive
    /// only while the buffer is shorter than that bound.
    unanchored: Vec<(usize, usize)>,
    /// Max floating reach of the rules without anchored atoms.
    free_reach: usize,
    /// Max over rules of the atom end bounds.
    reach: usize,
    /// Length of the longest floating pattern.
    longest_pattern: usize,
    /// `by_first_byte[b]`: the floating patterns that can begin with byte `b`.
    by_first_byte: [Vec<usize>; 256],
}

/// The automaton over the floating patterns of a direction, and how to drive it.
struct PatternSearch {
    dfa: DFA,
    /// `ids[p]`: the index into `DirectionMatcher::patterns` of the automaton's
    /// pattern `p`.
    ids: Vec<usize>,
    /// The automaton folds ASCII case (some pattern is `nocase`): hits of the other
    /// patterns are checked exactly.
    nocase: bool,
    /// Start state: anchored for [`SearchMode::Grams`], unanchored for
    /// [`SearchMode::Walk`].
    start: StateID,
    mode: SearchMode,
}

/// The rules of a direction, keyed by the first bytes of their first anchored atom.
///
/// Checking every rule's anchored atoms costs a pass over all rules per call, which
/// grows with the rule set; looking up the bytes at each key offset costs one binary
/// search per distinct (offset, key length, case handling), whatever the rule count.
/// The index only narrows the rules down: each rule it returns is then checked in
/// full ([`FixedAtom::agrees`]), so verdicts are those of a pass over all rules.
struct AnchorIndex {
    groups: Vec<KeyGroup>,
}

/// The rules whose first anchored atom has this offset, key length and case handling.
struct KeyGroup {
    offset: usize,
    /// Bytes of the key, 1 to [`KEY_BYTES`].
    len: usize,
    nocase: bool,
    /// (packed key, rule index), sorted. See [`pack_key`].
    entries: Vec<(u32, u32)>,
    /// Open-addressed hash table of the distinct keys: (key, start, end) of the run of
    /// `entries` with that key; `end == 0` marks a free slot. A length of a power of
    /// two, at least twice the distinct keys. A whole key is looked up here (one
    /// probe, mostly), a partial one by binary search in `entries`.
    slots: Vec<(u32, u32, u32)>,
}

/// Most leading bytes of an anchored atom that key the [`AnchorIndex`].
const KEY_BYTES: usize = 4;

/// How [`DirectionMatcher::scan`] finds occurrences of the floating patterns.
///
/// A DFA walk over every byte is a chain of dependent table loads; a q-gram filter
/// tests positions independently and skips most of them, sending the DFA only where a
/// pattern may start.
enum SearchMode {
    /// Every pattern has more than `gram` bytes (`gram` is 2 or 3). Only the positions
    /// `0, step, 2 * step, ...` are tested, `step` being at most the shortest pattern
    /// length minus `gram` plus 1, so any occurrence covers one of them with a whole
    /// q-gram at its offset `q < step`. `offsets[gram_key(q-gram)]` has bit `q` set if
    /// some pattern has that q-gram at offset `q` (keys of 3-grams are hashed, and a
    /// collision only costs a wasted check). A hit implies a start for each bit; the
    /// q-gram there must be the first q-gram of some pattern (bit `gram_key` of
    /// `firsts`), and only then does the anchored DFA walk from it. The second test
    /// keeps the DFA, whose size grows with the patterns and which misses cache once
    /// large, off most hits: with many patterns `offsets` fills up, `firsts` far less.
    /// When the automaton folds case, keys are taken of ASCII-lowercased q-grams, so a
    /// `nocase` pattern needs one entry and not one per case variant.
    Grams {
        gram: usize,
        step: usize,
        offsets: Box<[u8; 65536]>,
        firsts: Box<[u64; 1024]>,
    },
    /// Some pattern is a single byte: walk the unanchored DFA over every byte.
    Walk,
}

/// A distinct floating pattern (same bytes and same case handling).
struct Pattern {
    bytes: Vec<u8>,
    nocase: bool,
    /// Used by a rule without anchored atoms, so looked for in every buffer. The
    /// others (gated) only matter once a rule's anchored atoms agree with the buffer.
    free: bool,
    /// (rule index, bound) of each floating atom that uses this pattern.
    users: Vec<(usize, usize)>,
    /// The rules without anchored atoms that use this pattern.
    free_users: Vec<usize>,
}

struct CompiledRule {
    tag: u32,
    /// Sorted by offset.
    anchored: Vec<FixedAtom>,
    floating: Vec<FloatingAtom>,
    /// Smallest offset of an anchored atom.
    anchored_first: Option<usize>,
    /// (end, start) of the anchored atom that ends last (then starts last).
    anchored_last: Option<(usize, usize)>,
    /// Max bound of the floating atoms (0 when none).
    floating_reach: usize,
}

struct FixedAtom {
    offset: usize,
    bytes: Vec<u8>,
    nocase: bool,
}

struct FloatingAtom {
    /// Index into `DirectionMatcher::patterns`.
    pattern: usize,
    len: usize,
    /// The pattern must end at or before this byte.
    bound: usize,
}

/// Where a candidate rule stands.
enum Judgement {
    /// All atoms hold.
    Complete(Completion),
    /// Some atom can no longer hold.
    Dead,
    /// Could still match; `progress`: an atom holds or the buffer reaches an anchored one.
    Alive { progress: bool },
}

/// Where a rule completes: the end of its completing atom, its tag, and the start of
/// that atom. Ordered so that the earliest completion, then the lowest tag, is least.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Completion {
    end: usize,
    tag: u32,
    offset: usize,
}

/// A set of rule indexes, kept on the stack.
#[derive(Debug, PartialEq, Eq)]
struct RuleBits {
    words: [u64; RULE_WORDS],
}

impl PayloadMatcher {
    /// Compile all rules. `window` = max bytes ever inspected (`Within(n)` with
    /// `n > window` is an error; `At(o)` with `o + len > window` too).
    pub fn compile(rules: &[PayloadRule], window: usize) -> Result<Self, String> {
        if u32::try_from(window).is_err() {
            return Err(format!(
                "inspection window {window} does not fit in 32 bits"
            ));
        }
        for rule in rules {
            validate(rule, window)?;
        }
        Ok(Self {
            client: DirectionMatcher::build(rules, Direction::Client)?,
            server: DirectionMatcher::build(rules, Direction::Server)?,
        })
    }

    /// Classify the bytes of direction `dir` received so far (all of them, from the
    /// first byte of the stream).
    pub fn classify(&self, dir: Direction, buf: &[u8]) -> Outcome {
        self.direction(dir).classify(buf)
    }

    /// How far into a stream rules of this direction can reach (max over rules of the
    /// atom end bounds); 0 if no rules.
    pub fn reach(&self, dir: Direction) -> usize {
        self.direction(dir).reach
    }

    /// Number of rules, both directions together.
    pub fn rule_count(&self) -> usize {
        self.client.rules.len() + self.server.rules.len()
    }

    fn direction(&self, dir: Direction) -> &DirectionMatcher {
        match dir {
            Direction::Client => &self.client,
            Direction::Server => &self.server,
        }
    }
}

impl std::fmt::Debug for PayloadMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadMatcher")
            .field("client_rules", &self.client.rules.len())
            .field("client_patterns", &self.client.patterns.len())
            .field("server_rules", &self.server.rules.len())
            .field("server_patterns", &self.server.patterns.len())
            .finish()
    }
}

/// Check one rule against the limits of the model and the inspection window.
fn validate(rule: &PayloadRule, window: usize) -> Result<(), String> {
    let tag = rule.tag;
    if rule.atoms.is_empty() {
        return Err(format!("rule {tag}: no atoms"));
    }
    if rule.atoms.len() > MAX_ATOMS_PER_RULE {
        return Err(format!(
            "rule {tag}: {} atoms, at most {MAX_ATOMS_PER_RULE} allowed",
            rule.atoms.len()
        ));
    }
    for (i, atom) in rule.atoms.iter().enumerate() {
        let len = atom.bytes.len();
        if len == 0 {
            return Err(format!("rule {tag}, atom {i}: empty pattern"));
        }
        match atom.anchor {
            Anchor::At(offset) => match offset.checked_add(len) {
                Some(end) if end <= window => {}
                _ => {
                    return Err(format!(
                        "rule {tag}, atom {i}: At({offset}) with {len} bytes ends past the \
                         inspection window of {window} bytes"
                    ))
                }
            },
            Anchor::Within(n) => {
                if n > window {
                    return Err(format!(
                        "rule {tag}, atom {i}: Within({n}) is past the inspection window of \
                         {window} bytes"
                    ));
                }
                if n < len {
                    return Err(format!(
                        "rule {tag}, atom {i}: Within({n}) is shorter than its {len}-byte pattern"
                    ));
                }
            }
        }
    }
    Ok(())
}

impl DirectionMatcher {
    fn build(rules: &[PayloadRule], dir: Direction) -> Result<Self, String> {
        let selected: Vec<&PayloadRule> = rules.iter().filter(|r| r.direction == dir).collect();
        if selected.len() > MAX_RULES_PER_DIRECTION {
            return Err(format!(
                "{dir:?}: {} rules, at most {MAX_RULES_PER_DIRECTION} allowed",
                selected.len()
            ));
        }
        let mut patterns: Vec<Pattern> = Vec::new();
        let mut pattern_ids: HashMap<(Vec<u8>, bool), usize> = HashMap::new();
        let mut compiled = Vec::with_capacity(selected.len());
        let mut reach = 0;
        for (index, rule) in selected.iter().enumerate() {
            let mut anchored = Vec::new();
            let mut floating = Vec::new();
            for atom in &rule.atoms {
                match atom.anchor {
                    Anchor::At(offset) => anchored.push(FixedAtom {
                        offset,
                        bytes: atom.bytes.clone(),
                        nocase: atom.nocase,
                    }),
                    Anchor::Within(bound) => {
                        let key = if atom.nocase {
                            (atom.bytes.to_ascii_lowercase(), true)
                        } else {
                            (atom.bytes.clone(), false)
                        };
                        let id = *pattern_ids.entry(key).or_insert_with(|| {
                            patterns.push(Pattern {
                                bytes: atom.bytes.clone(),
                                nocase: atom.nocase,
                                free: false,
                                free_users: Vec::new(),
                                users: Vec::new(),
                            });
                            patterns.len() - 1
                        });
                        if let Some(pattern) = patterns.get_mut(id) {
                            pattern.users.push((index, bound));
                        }
                        floating.push(FloatingAtom {
                            pattern: id,
                            len: atom.bytes.len(),
                            bound,
                        });
                    }
                }
            }
            anchored.sort_by_key(|a| a.offset);
            let anchored_first = anchored.first().map(|a| a.offset);
            let anchored_last = anchored
                .iter()
                .map(|a| (a.offset + a.bytes.len(), a.offset))
                .max();
            let floating_reach = floating.iter().map(|f| f.bound).max().unwrap_or(0);
            reach = reach
                .max(floating_reach)
                .max(anchored_last.map_or(0, |(end, _)| end));
            compiled.push(CompiledRule {
                tag: rule.tag,
                anchored,
                floating,
                anchored_first,
                anchored_last,
                floating_reach,
            });
        }
        if patterns.len() > MAX_PATTERNS_PER_DIRECTION {
            return Err(format!(
                "{dir:?}: {} distinct floating patterns, at most {MAX_PATTERNS_PER_DIRECTION} \
                 allowed",
                patterns.len()
            ));
        }

        let mut unanchored = Vec::new();
        let mut free_reach = 0;
        for (index, rule) in compiled.iter().enumerate() {
            if !rule.anchored.is_empty() {
                continue;
            }
            let min_bound = rule.floating.iter().map(|a| a.bound).min().unwrap_or(0);
            unanchored.push((min_bound, index));
            free_reach = free_reach.max(rule.floating_reach);
            for atom in &rule.floating {
                if let Some(pattern) = patterns.get_mut(atom.pattern) {
                    pattern.free = true;
                    if !pattern.free_users.contains(&index) {
                        pattern.free_users.push(index);
                    }
                }
            }
        }
        unanchored.sort_unstable_by(|a, b| b.cmp(a));
        let mut by_first_byte: [Vec<usize>; 256] = std::array::from_fn(|_| Vec::new());
        for (id, pattern) in patterns.iter().enumerate() {
            if let Some(&first) = pattern.bytes.first() {
                let mut firsts = vec![first];
                if pattern.nocase && first.is_ascii_alphabetic() {
                    firsts.push(first ^ 0x20);
                }
                for byte in firsts {
                    by_first_byte[usize::from(byte)].push(id);
                }
            }
        }
        let longest_pattern = patterns.iter().map(|p| p.bytes.len()).max().unwrap_or(0);
        let index = AnchorIndex::build(&compiled);
        let search = PatternSearch::build(&patterns, |_| true, dir)?;
        let free_search = PatternSearch::build(&patterns, |p| p.free, dir)?;
        Ok(Self {
            search,
            free_search,
            patterns,
            rules: compiled,
            index,
            unanchored,
            free_reach,
            reach,
            longest_pattern,
            by_first_byte,
        })
    }

    fn classify(&self, buf: &[u8]) -> Outcome {
        let anchored = self.agreeing(buf);
        // The table of first ends is kept per thread and only its entries that a call
        // set are cleared afterwards: clearing a whole table of 4,096 patterns per
        // call would cost more than the search once the set is large.
        FIRST_END.with(|table| match table.try_borrow_mut() {
            Ok(mut table) => self.decide(buf, anchored, &mut table[..]),
            Err(_) => self.decide(buf, anchored, &mut [NOT_FOUND; MAX_PATTERNS_PER_DIRECTION]),
        })
    }

    /// The rules with anchored atoms that all agree with `buf`, found through the
    /// index.
    fn agreeing(&self, buf: &[u8]) -> RuleBits {
        let mut agree = RuleBits::new();
        for group in &self.index.groups {
            for &(_, index) in group.lookup(buf) {
                let index = index as usize;
                if self
                    .rules
                    .get(index)
                    .is_some_and(|rule| rule.anchored.iter().all(|a| a.agrees(buf)))
                {
                    agree.insert(index);
                }
            }
        }
        agree
    }

    /// The rules with anchored atoms that all agree with `buf`, by a pass over all
    /// rules (what [`Self::agreeing`] must equal).
    #[cfg(test)]
    fn agreeing_by_pass(&self, buf: &[u8]) -> RuleBits {
        let mut agree = RuleBits::new();
        for (index, rule) in self.rules.iter().enumerate() {
            if !rule.anchored.is_empty() && rule.anchored.iter().all(|a| a.agrees(buf)) {
                agree.insert(index);
            }
        }
        agree
    }

    /// `anchored`: the rules with anchored atoms that agree with `buf`. `first_end`
    /// has an entry per pattern, all [`NOT_FOUND`], and is left so.
    fn decide(&self, buf: &[u8], anchored: RuleBits, first_end: &mut [u32]) -> Outcome {
        let len = buf.len();

        // 1. The rules in play: those of `anchored` and every rule without anchored
        //    atoms. How far do their floating atoms reach?
        let mut any_candidate = !self.unanchored.is_empty();
        let mut scan_to = self.free_reach.min(len);
        for index in anchored.iter() {
            if let Some(rule) = self.rules.get(index) {
                any_candidate = true;
                scan_to = scan_to.max(rule.floating_reach.min(len));
            }
        }
        if !any_candidate {
            return Outcome::NoMatch;
        }

        // 2. Floating atoms: the part of the buffer that the rules in play can reach,
        //    recording where each pattern first ends.
        let mut found = RuleBits::new();
        if let Some(haystack) = buf.get(..scan_to) {
            self.find_floating(haystack, &anchored, first_end, &mut found);
        }

        // 3. The rules to judge: a rule without anchored atoms none of whose patterns
        //    was found is dead once the buffer reaches its smallest bound, so only
        //    those with a pattern found or with room left need a look.
        let mut candidates = anchored;
        for id in found.iter() {
            for &index in self.patterns.get(id).map_or(&[][..], |p| &p.free_users) {
                candidates.insert(index);
            }
        }
        for &(min_bound, index) in &self.unanchored {
            if min_bound <= len {
                break;
            }
            candidates.insert(index);
        }
        let outcome = self.judge_all(buf, candidates, first_end);
        for id in found.iter() {
            if let Some(slot) = first_end.get_mut(id) {
                *slot = NOT_FOUND;
            }
        }
        outcome
    }

    /// Judge `candidates` (complete, dead or alive, see [`CompiledRule::judge`]) and
    /// give the outcome, taking any rule in play but not in `candidates` to be dead.
    fn judge_all(&self, buf: &[u8], candidates: RuleBits, first_end: &[u32]) -> Outcome {
        let len = buf.len();
        let mut candidates = candidates;
        let mut best: Option<Completion> = None;
        let (mut any_alive, mut progress) = (false, false);
        for index in candidates.iter() {
            let Some(rule) = self.rules.get(index) else {
                continue;
            };
            match rule.judge(len, first_end) {
                Judgement::Complete(done) => keep_earliest(&mut best, done),
                Judgement::Dead => candidates.remove(index),
                Judgement::Alive { progress: p } => {
                    any_alive = true;
                    progress |= p;
                }
            }
        }
        if let Some(done) = best {
            Outcome::Match {
                tag: done.tag,
                offset: done.offset,
            }
        } else if !any_alive {
            Outcome::NoMatch
        } else if progress {
            Outcome::Pending { forward_upto: 0 }
        } else {
            Outcome::Pending {
                forward_upto: len - self.split_suffix(buf, &candidates),
            }
        }
    }

    /// The classification of `buf` as it was made before the anchor index and the
    /// split of free and gated patterns: every rule checked, one search for all
    /// patterns, every rule in play judged. [`Self::classify`] must give the same.
    #[cfg(test)]
    fn classify_by_pass(&self, buf: &[u8]) -> Outcome {
        let len = buf.len();
        let mut candidates = RuleBits::new();
        let mut any_candidate = false;
        let mut scan_to = 0;
        for (index, rule) in self.rules.iter().enumerate() {
            if rule.anchored.iter().all(|a| a.agrees(buf)) {
                candidates.insert(index);
                any_candidate = true;
                scan_to = scan_to.max(rule.floating_reach.min(len));
            }
        }
        if !any_candidate {
            return Outcome::NoMatch;
        }
        let mut first_end = [NOT_FOUND; MAX_PATTERNS_PER_DIRECTION];
        let mut found = RuleBits::new();
        if let (Some(haystack), Some(search)) = (buf.get(..scan_to), &self.search) {
            self.scan(search, haystack, &mut first_end, &mut found);
        }
        self.judge_all(buf, candidates, &first_end)
    }

    /// Find the floating patterns of the rules in play in `haystack` (see
    /// [`Self::scan`]): the free patterns, and the gated ones of the rules of
    /// `anchored`.
    ///
    /// The free patterns go through their own automaton, whose size does not depend
    /// on the rules with anchored atoms. The gated patterns of the few rules in play
    /// with anchored atoms are looked for one by one, each only as far as its atom's
    /// bound; with more of them than [`MAX_GATED_SEARCHES`], one search for every
    /// pattern is cheaper. Either way every pattern of a rule in play ends up with the
    /// end of its earliest occurrence that its atom's bound allows, or with one that
    /// no bound of its atoms allows, as one search for all patterns over `haystack`
    /// gives.
    fn find_floating(
        &self,
        haystack: &[u8],
        anchored: &RuleBits,
        first_end: &mut [u32],
        found: &mut RuleBits,
    ) {
        let mut gated = [(0usize, 0usize); MAX_GATED_SEARCHES];
        let mut count = 0;
        for index in anchored.iter() {
            let Some(rule) = self.rules.get(index) else {
                continue;
            };
            for atom in &rule.floating {
                if self.patterns.get(atom.pattern).is_some_and(|p| p.free) {
                    continue;
                }
                let Some(slot) = gated.get_mut(count) else {
                    if let Some(search) = &self.search {
                        self.scan(search, haystack, first_end, found);
                    }
                    return;
                };
                *slot = (atom.pattern, atom.bound);
                count += 1;
            }
        }
        if let Some(search) = &self.free_search {
            self.scan(search, haystack, first_end, found);
        }
        for &(id, bound) in gated.get(..count).unwrap_or(&[]) {
            let (Some(pattern), Some(slot)) = (self.patterns.get(id), first_end.get_mut(id)) else {
                continue;
            };
            let within = haystack.get(..bound).unwrap_or(haystack);
            if let Some(end) = first_occurrence_end(within, &pattern.bytes, pattern.nocase) {
                // Ends are at most the window, which `compile` checked fits in 32 bits.
                if let Ok(end) = u32::try_from(end) {
                    *slot = (*slot).min(end);
                    found.insert(id);
                }
            }
        }
    }

    /// Find the floating patterns in `haystack`, lowering `first_end[p]` to the end of
    /// the earliest (verified) occurrence of each pattern `p`.
    fn scan(
        &self,
        search: &PatternSearch,
        haystack: &[u8],
        first_end: &mut [u32],
        found: &mut RuleBits,
    ) {
        match &search.mode {
            SearchMode::Walk => {
                let mut state = search.start;
                for (i, &byte) in haystack.iter().enumerate() {
                    state = search.dfa.next_state(Anchored::No, state, byte);
                    if search.dfa.is_special(state) {
                        if search.dfa.is_dead(state) {
                            // Standard match semantics have no dead state; should one
                            // appear, go on from the start rather than stop finding.
                            state = search.start;
                            continue;
                        }
                        self.record(search, state, haystack, i + 1, first_end, found);
                    }
                }
            }
            SearchMode::Grams {
                gram: 2,
                step,
                offsets,
                ..
            } => self.scan_grams::<2>(search, haystack, *step, offsets, first_end, found),
            SearchMode::Grams { step, offsets, .. } => {
                self.scan_grams::<3>(search, haystack, *step, offsets, first_end, found)
            }
        }
    }

    /// Test the `G`-gram at every `step`-th position (see [`SearchMode::Grams`]).
    fn scan_grams<const G: usize>(
        &self,
        search: &PatternSearch,
        haystack: &[u8],
        step: usize,
        offsets: &[u8; 65536],
        first_end: &mut [u32],
        found: &mut RuleBits,
    ) {
        let fold = search.nocase;
        let mut at = 0;
        while let Some(bytes) = haystack.get(at..at + G) {
            let mask = offsets[gram_key(bytes, fold)];
            if mask != 0 {
                self.candidates::<G>(search, haystack, at, mask, first_end, found);
            }
            at += step;
        }
    }

    /// The q-gram at `at` occurs at the offsets in `mask` of some pattern: look for
    /// patterns starting at each of the implied positions.
    #[cold]
    #[inline(never)]
    fn candidates<const G: usize>(
        &self,
        search: &PatternSearch,
        haystack: &[u8],
        at: usize,
        mask: u8,
        first_end: &mut [u32],
        found: &mut RuleBits,
    ) {
        let SearchMode::Grams { firsts, .. } = &search.mode else {
            return;
        };
        let mut mask = mask;
        while mask != 0 {
            let offset = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let Some(start) = at.checked_sub(offset) else {
                continue;
            };
            let Some(gram) = haystack.get(start..start + G) else {
                continue;
            };
            if !bit(firsts, gram_key(gram, search.nocase)) {
                continue;
            }
            let mut state = search.start;
            for (i, &byte) in haystack.iter().enumerate().skip(start) {
                state = search.dfa.next_state(Anchored::Yes, state, byte);
                if search.dfa.is_special(state) {
                    if search.dfa.is_dead(state) {
                        break;
                    }
                    self.record(search, state, haystack, i + 1, first_end, found);
                }
            }
        }
    }

    /// Record the patterns of match state `state`, which all end at `end`. (After an
    /// anchored walk from some start, the list also holds the patterns that are
    /// suffixes of the one found: they occur too, so recording them is right.)
    fn record(
        &self,
        search: &PatternSearch,
        state: StateID,
        haystack: &[u8],
        end: usize,
        first_end: &mut [u32],
        found: &mut RuleBits,
    ) {
        if !search.dfa.is_match(state) {
            return;
        }
        // Ends are at most the haystack length, itself at most a rule bound and so at
        // most the window, which `compile` checked fits in 32 bits.
        let Ok(end32) = u32::try_from(end) else {
            return;
        };
        for i in 0..search.dfa.match_len(state) {
            let Some(&id) = search
                .ids
                .get(search.dfa.match_pattern(state, i).as_usize())
            else {
                continue;
            };
            let (Some(slot), Some(pattern)) = (first_end.get_mut(id), self.patterns.get(id)) else {
                continue;
            };
            if end32 >= *slot {
                continue;
            }
            let begin = end.saturating_sub(pattern.bytes.len());
            let verify = search.nocase && !pattern.nocase;
            if verify && haystack.get(begin..end) != Some(&pattern.bytes[..]) {
                continue;
            }
            *slot = end32;
            found.insert(id);
        }
    }

    /// Length of the longest suffix of `buf` that is a proper prefix of a floating
    /// atom of a living rule and could still end within that atom's bound.
    fn split_suffix(&self, buf: &[u8], alive: &RuleBits) -> usize {
        let len = buf.len();
        let from = len.saturating_sub(self.longest_pattern.saturating_sub(1));
        for (start, &byte) in buf.iter().enumerate().skip(from) {
            let tail = &buf[start..];
            for &id in &self.by_first_byte[usize::from(byte)] {
                let Some(pattern) = self.patterns.get(id) else {
                    continue;
                };
                let n = pattern.bytes.len();
                if n > tail.len()
                    && bytes_eq(tail, &pattern.bytes[..tail.len()], pattern.nocase)
                    && pattern
                        .users
                        .iter()
                        .any(|&(rule, bound)| start + n <= bound && alive.contains(rule))
                {
                    return len - start;
                }
            }
        }
        0
    }
}

impl PatternSearch {
    /// The automaton over the patterns that `select` picks; `None` when it picks none.
    fn build(
        all: &[Pattern],
        select: impl Fn(&Pattern) -> bool,
        dir: Direction,
    ) -> Result<Option<Self>, String> {
        let ids: Vec<usize> = (0..all.len())
            .filter(|&id| all.get(id).is_some_and(&select))
            .collect();
        let patterns: Vec<&Pattern> = ids.iter().filter_map(|&id| all.get(id)).collect();
        if patterns.is_empty() {
            return Ok(None);
        }
        let any_nocase = patterns.iter().any(|p| p.nocase);
        let shortest = patterns.iter().map(|p| p.bytes.len()).min().unwrap_or(0);
        let mode = if shortest >= 2 {
            // 3-grams give far fewer false candidates on text than bigrams, but need
            // longer patterns for the same step.
            let gram = if shortest >= 4 { 3 } else { 2 };
            let step = (shortest + 1 - gram).min(8);
            let mut offsets: Box<[u8; 65536]> = vec![0u8; 65536]
                .into_boxed_slice()
                .try_into()
                .map_err(|_| "q-gram table has the wrong size".to_string())?;
            let mut firsts: Box<[u64; 1024]> = vec![0u64; 1024]
                .into_boxed_slice()
                .try_into()
                .map_err(|_| "q-gram table has the wrong size".to_string())?;
            for pattern in &patterns {
                for (offset, bytes) in pattern.bytes.windows(gram).take(step).enumerate() {
                    offsets[gram_key(bytes, any_nocase)] |= 1 << offset;
                    if offset == 0 {
                        let key = gram_key(bytes, any_nocase);
                        firsts[key / 64] |= 1 << (key % 64);
                    }
                }
            }
            SearchMode::Grams {
                gram,
                step,
                offsets,
                firsts,
            }
        } else {
            SearchMode::Walk
        };
        let (start_kind, anchored) = match mode {
            SearchMode::Grams { .. } => (StartKind::Anchored, Anchored::Yes),
            SearchMode::Walk => (StartKind::Unanchored, Anchored::No),
        };
        let dfa = DFA::builder()
            .match_kind(MatchKind::Standard)
            .ascii_case_insensitive(any_nocase)
            .start_kind(start_kind)
            .prefilter(false)
            .build(patterns.iter().map(|p| &p.bytes))
            .map_err(|e| format!("{dir:?}: cannot build the pattern automaton: {e}"))?;
        let start = dfa
            .start_state(anchored)
            .map_err(|e| format!("{dir:?}: pattern automaton has no start state: {e}"))?;
        Ok(Some(Self {
            dfa,
            ids,
            nocase: any_nocase,
            start,
            mode,
        }))
    }
}

/// End of the first occurrence of `needle` (non-empty) in `haystack`.
fn first_occurrence_end(haystack: &[u8], needle: &[u8], nocase: bool) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let last_start = haystack.len().checked_sub(needle.len())?;
    let mut start = 0;
    while start <= last_start {
        let skip = haystack
            .get(start..=last_start)?
            .iter()
            .position(|&b| b == first || (nocase && b.eq_ignore_ascii_case(&first)))?;
        start += skip;
        let after = start + 1;
        if haystack
            .get(after..after + rest.len())
            .is_some_and(|h| bytes_eq(h, rest, nocase))
        {
            return Some(start + needle.len());
        }
        start = after;
    }
    None
}

/// Table index of a 2- or 3-byte q-gram, ASCII-lowercased first when `fold`: bigrams
/// map one to one, 3-grams are hashed.
#[inline(always)]
fn gram_key(gram: &[u8], fold: bool) -> usize {
    let lower = |b: u8| if fold { b.to_ascii_lowercase() } else { b };
    match *gram {
        [a, b] => usize::from(u16::from_le_bytes([lower(a), lower(b)])),
        [a, b, c, ..] => {
            let packed = u32::from_le_bytes([lower(a), lower(b), lower(c), 0]);
            (packed.wrapping_mul(0x9e37_79b1) >> 16) as usize
        }
        _ => 0,
    }
}

/// Bit `key` (below 65,536) of a 65,536-bit table.
#[inline(always)]
fn bit(table: &[u64; 1024], key: usize) -> bool {
    table
        .get(key / 64)
        .is_some_and(|word| word & (1 << (key % 64)) != 0)
}

impl AnchorIndex {
    fn build(rules: &[CompiledRule]) -> Self {
        let mut groups: Vec<KeyGroup> = Vec::new();
        for (index, rule) in rules.iter().enumerate() {
            // `anchored` is sorted by offset: key on the atom nearest the start.
            let Some(first) = rule.anchored.first() else {
                continue;
            };
            let len = first.bytes.len().min(KEY_BYTES);
            let key = pack_key(&first.bytes[..len], first.nocase);
            let Ok(index) = u32::try_from(index) else {
                continue;
            };
            let at = groups
                .iter()
                .position(|g| g.offset == first.offset && g.len == len && g.nocase == first.nocase);
            match at.and_then(|at| groups.get_mut(at)) {
                Some(group) => group.entries.push((key, index)),
                None => groups.push(KeyGroup {
                    offset: first.offset,
                    len,
                    nocase: first.nocase,
                    entries: vec![(key, index)],
                    slots: Vec::new(),
                }),
            }
        }
        for group in &mut groups {
            group.entries.sort_unstable();
            group.fill_slots();
        }
        Self { groups }
    }
}

impl KeyGroup {
    /// The entries whose key agrees with the bytes of `buf` at the group's offset: all
    /// of them while the buffer stops before it, those starting with the bytes
    /// present while it stops inside the key, else those equal to it.
    fn lookup(&self, buf: &[u8]) -> &[(u32, u32)] {
        let present = buf.get(self.offset..).unwrap_or(&[]);
        let present = &present[..present.len().min(self.len)];
        let low = pack_key(present, self.nocase);
        if present.len() == self.len {
            return self.whole(low);
        }
        // Key bits not given by the bytes present: any value.
        let free_bits = 32 - 8 * present.len() as u32;
        let high = low | ((1u64 << free_bits) - 1) as u32;
        let from = self.entries.partition_point(|&(key, _)| key < low);
        let to = self.entries.partition_point(|&(key, _)| key <= high);
        self.entries.get(from..to).unwrap_or(&[])
    }

    /// The entries with key `key`, through `slots`.
    fn whole(&self, key: u32) -> &[(u32, u32)] {
        let mask = self.slots.len().wrapping_sub(1);
        let mut at = slot_hash(key) & mask;
        // At least half the slots are free, so the probe ends; the bound is a guard.
        for _ in 0..self.slots.len() {
            let Some(&(k, start, end)) = self.slots.get(at) else {
                break;
            };
            if end == 0 {
                break;
            }
            if k == key {
                return self
                    .entries
                    .get(start as usize..end as usize)
                    .unwrap_or(&[]);
            }
            at = (at + 1) & mask;
        }
        &[]
    }

    /// Build `slots` from the sorted `entries`.
    fn fill_slots(&mut self) {
        let mut runs: Vec<(u32, u32, u32)> = Vec::new();
        for (i, &(key, _)) in self.entries.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            match runs.last_mut() {
                Some(run) if run.0 == key => run.2 = i + 1,
                _ => runs.push((key, i, i + 1)),
            }
        }
        let size = (runs.len() * 2).next_power_of_two();
        let mut slots = vec![(0, 0, 0); size];
        let mask = size - 1;
        for run in runs {
            let mut at = slot_hash(run.0) & mask;
            while slots.get(at).is_some_and(|s| s.2 != 0) {
                at = (at + 1) & mask;
            }
            if let Some(slot) = slots.get_mut(at) {
                *slot = run;
            }
        }
        self.slots = slots;
    }
}

/// Hash of a packed key for [`KeyGroup::slots`] (Fibonacci hashing: the high bits of
/// the product, which depend on every key byte).
fn slot_hash(key: u32) -> usize {
    (u64::from(key).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize
}

/// Up to [`KEY_BYTES`] bytes packed big-endian into the high end of a `u32` (so that
/// keys sharing leading bytes sort together), ASCII-lowercased when `nocase`.
fn pack_key(bytes: &[u8], nocase: bool) -> u32 {
    let mut key = [0u8; KEY_BYTES];
    for (slot, &byte) in key.iter_mut().zip(bytes) {
        *slot = if nocase {
            byte.to_ascii_lowercase()
        } else {
            byte
        };
    }
    u32::from_be_bytes(key)
}

impl CompiledRule {
    /// The state of the rule in a buffer of `len` bytes whose anchored atoms are known
    /// to agree with the rule, floating atoms being looked up in `first_end`.
    fn judge(&self, len: usize, first_end: &[u32]) -> Judgement {
        let mut complete = self.anchored_last.map_or(true, |(end, _)| end <= len);
        let (mut end, mut start) = self.anchored_last.unwrap_or((0, 0));
        let mut found_any = false;
        for atom in &self.floating {
            let found = first_end.get(atom.pattern).copied().unwrap_or(NOT_FOUND);
            if found != NOT_FOUND && found as usize <= atom.bound {
                found_any = true;
                let found = found as usize;
                let found_start = found.saturating_sub(atom.len);
                if (found, found_start) > (end, start) {
                    end = found;
                    start = found_start;
                }
            } else if len >= atom.bound {
                return Judgement::Dead;
            } else {
                complete = false;
            }
        }
        if complete {
            Judgement::Complete(Completion {
                end,
                tag: self.tag,
                offset: start,
            })
        } else {
            Judgement::Alive {
                progress: found_any || self.anchored_first.is_some_and(|offset| offset < len),
            }
        }
    }
}

impl FixedAtom {
    /// The bytes present at the atom's offset (all, some or none of it) agree with it.
    fn agrees(&self, buf: &[u8]) -> bool {
        let Some(present) = buf.get(self.offset..) else {
            return true;
        };
        let n = present.len().min(self.bytes.len());
        bytes_eq(&present[..n], &self.bytes[..n], self.nocase)
    }
}

/// Keep the completion that ends first (then lowest tag, then smallest offset).
fn keep_earliest(best: &mut Option<Completion>, done: Completion) {
    if best.map_or(true, |b| done < b) {
        *best = Some(done);
    }
}

/// Byte-string equality, ASCII case-insensitive when `nocase`. A plain loop: the
/// strings are short, where a call to `memcmp` costs more than the comparison.
fn bytes_eq(a: &[u8], b: &[u8], nocase: bool) -> bool {
    a.len() == b.len()
        && if nocase {
            a.iter().zip(b).all(|(x, y)| x.eq_ignore_ascii_case(y))
        } else {
            a.iter().zip(b).all(|(x, y)| x == y)
        }
}

impl RuleBits {
    fn new() -> Self {
        Self {
            words: [0; RULE_WORDS],
        }
    }

    fn insert(&mut self, index: usize) {
        if let Some(word) = self.words.get_mut(index / 64) {
            *word |= 1 << (index % 64);
        }
    }

    fn remove(&mut self, index: usize) {
        if let Some(word) = self.words.get_mut(index / 64) {
            *word &= !(1 << (index % 64));
        }
    }

    /// The members, in increasing order (a copy: removing members while iterating is
    /// fine).
    fn iter(&self) -> impl Iterator<Item = usize> {
        let words = self.words;
        words.into_iter().enumerate().flat_map(|(w, word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let bit = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                Some(w * 64 + bit)
            })
        })
    }

    fn contains(&self, index: usize) -> bool {
        self.words
            .get(index / 64)
            .is_some_and(|word| word & (1 << (index % 64)) != 0)
    }
}

/// Inspection window of the sample rule set used by [`fuzz_logic`].
const SAMPLE_WINDOW: usize = 16 * 1024;

/// Tags of the sample rule set.
mod sample {
    pub const OSCAR: u32 = 1;
    pub const YMSG: u32 = 2;
    pub const MSNP: u32 = 3;
    pub const XMPP: u32 = 4;
    pub const IRC: u32 = 5;
    pub const MTPROTO: u32 = 6;
    pub const WHATSAPP: u32 = 7;
    pub const XMPP_SERVER: u32 = 8;
}

fn at(offset: usize, bytes: &[u8]) -> Atom {
    Atom {
        bytes: bytes.to_vec(),
        anchor: Anchor::At(offset),
        nocase: false,
    }
}

fn within(n: usize, bytes: &[u8]) -> Atom {
    Atom {
        bytes: bytes.to_vec(),
        anchor: Anchor::Within(n),
        nocase: false,
    }
}

fn within_nocase(n: usize, bytes: &[u8]) -> Atom {
    Atom {
        nocase: true,
        ..within(n, bytes)
    }
}

fn rule(tag: u32, direction: Direction, atoms: Vec<Atom>) -> PayloadRule {
    PayloadRule {
        tag,
        direction,
        atoms,
    }
}

/// A small fixed rule set for the fuzz target and the tests: one signature per
/// protocol family, from the protocols' first messages.
fn sample_rules() -> Vec<PayloadRule> {
    use Direction::{Client, Server};
    vec![
        // OSCAR (AIM/ICQ): FLAP start byte '*', channel 1 (signon); then, after the
        // 16-bit sequence number and data length, the FLAP version 00 00 00 01.
        rule(
            sample::OSCAR,
            Client,
            vec![at(0, &[0x2a, 0x01]), at(6, &[0x00, 0x00, 0x00, 0x01])],
        ),
        // YMSG (Yahoo! Messenger): magic "YMSG", then the 16-bit version (high byte 0)
        // and the 16-bit vendor ID 00 00.
        rule(
            sample::YMSG,
            Client,
            vec![at(0, b"YMSG"), at(6, &[0x00, 0x00])],
        ),
        // MSNP (MSN Messenger): the first command is VER with the protocol list.
        rule(
            sample::MSNP,
            Client,
            vec![at(0, b"VER "), within(40, b" MSNP")],
        ),
        // XMPP: the client's stream header in the jabber:client namespace.
        rule(
            sample::XMPP,
            Client,
            vec![
                within_nocase(256, b"<stream:stream"),
                within(1024, b"jabber:client"),
            ],
        ),
        // IRC: registration, NICK then USER.
        rule(
            sample::IRC,
            Client,
            vec![at(0, b"NICK "), within(512, b"\nUSER ")],
        ),
        // MTProto, abridged transport: tag byte EF, one length byte, then the
        // unencrypted first message whose auth_key_id is 8 zero bytes.
        rule(
            sample::MTPROTO,
            Client,
            vec![at(0, &[0xef]), at(2, &[0x00; 8])],
        ),
        // WhatsApp: the Noise prologue "WA" 06 03.
        rule(
            sample::WHATSAPP,
            Client,
            vec![at(0, &[0x57, 0x41, 0x06, 0x03])],
        ),
        // XMPP, the server's answering stream header.
        rule(
            sample::XMPP_SERVER,
            Server,
            vec![
                within_nocase(256, b"<stream:stream"),
                within(1024, b"jabber:client"),
            ],
        ),
    ]
}

/// Fuzz entry point: classifies `data` and its prefixes in both directions against a
/// small fixed rule set, and panics if an invariant of the contract breaks.
pub fn fuzz_logic(data: &[u8]) {
    static MATCHER: OnceLock<PayloadMatcher> = OnceLock::new();
    let matcher =
        MATCHER.get_or_init(
            || match PayloadMatcher::compile(&sample_rules(), SAMPLE_WINDOW) {
                Ok(matcher) => matcher,
                Err(e) => panic!("the sample rule set must compile: {e}"),
            },
        );
    for dir in [Direction::Client, Direction::Server] {
        check_prefixes(matcher, dir, data);
    }
}

/// Feeds growing prefixes of `data` and checks the contract between successive answers:
/// a match is final and stable, no-match is final, `forward_upto` stays within the
/// buffer, nothing forwarded belongs to the completing atom of a later match, and a
/// buffer past the direction's reach is never pending.
fn check_prefixes(matcher: &PayloadMatcher, dir: Direction, data: &[u8]) {
    let reach = matcher.reach(dir);
    let mut forwarded = 0;
    let mut previous: Option<Outcome> = None;
    let lengths = (0..=data.len().min(512))
        .chain((513..data.len()).step_by(61))
        .chain([data.len()]);
    for len in lengths {
        let Some(prefix) = data.get(..len) else {
            continue;
        };
        let outcome = matcher.classify(dir, prefix);
        match (previous, outcome) {
            (Some(Outcome::Match { .. }), now) => {
                assert_eq!(
                    previous,
                    Some(now),
                    "a match must be stable ({dir:?}, {len} bytes)"
                );
            }
            (Some(Outcome::NoMatch), now) => {
                assert_eq!(
                    now,
                    Outcome::NoMatch,
                    "no-match must be final ({dir:?}, {len} bytes)"
                );
            }
            (_, Outcome::Match { offset, .. }) => {
                assert!(
                    offset >= forwarded,
                    "atom at {offset} was already forwarded up to {forwarded} ({dir:?})"
                );
            }
            (_, Outcome::Pending { forward_upto }) => {
                assert!(forward_upto <= len, "forward_upto {forward_upto} > {len}");
                assert!(
                    len < reach,
                    "pending at {len} bytes, past the reach {reach}"
                );
                forwarded = forwarded.max(forward_upto);
            }
            (_, Outcome::NoMatch) => {}
        }
        previous = Some(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::sample::*;
    use super::*;

    const WINDOW: usize = SAMPLE_WINDOW;

    fn sample_matcher() -> PayloadMatcher {
        PayloadMatcher::compile(&sample_rules(), WINDOW).expect("the sample rules compile")
    }

    /// Marsaglia's xorshift64: deterministic noise without a `rand` dependency.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }

        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    fn find(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("fixture contains the needle")
    }

    // ---- Protocol fixtures -------------------------------------------------------

    /// OSCAR (AIM/ICQ) FLAP signon frame.
    fn oscar_signon() -> Vec<u8> {
        vec![
            0x2a, // FLAP start marker '*'
            0x01, // channel 1: new connection (signon)
            0x5a, 0x31, // sequence number (clients start at a random value)
            0x00, 0x0c, // data length: the 12 bytes below
            0x00, 0x00, 0x00, 0x01, // FLAP version 1
            0x00, 0x06, // TLV type 6: authorization cookie
            0x00, 0x04, // TLV length 4
            0xde, 0xad, 0xbe, 0xef, // cookie value
        ]
    }

    /// YMSG (Yahoo! Messenger) 20-byte header and an AUTH request.
    fn ymsg_auth() -> Vec<u8> {
        // Payload: key "1" (login id), separator C0 80, value "alice", separator C0 80.
        let payload: &[u8] = b"1\xc0\x80alice\xc0\x80";
        let mut b = Vec::new();
        b.extend_from_slice(b"YMSG"); // magic
        b.extend_from_slice(&[0x00, 0x10]); // protocol version 16
        b.extend_from_slice(&[0x00, 0x00]); // vendor ID 0
        b.extend_from_slice(&(payload.len() as u16).to_be_bytes()); // payload length
        b.extend_from_slice(&[0x00, 0x57]); // service 0x57: AUTH
        b.extend_from_slice(&[0x00, 0x00, 0x00, 0x00]); // status 0
        b.extend_from_slice(&[0x00, 0x00, 0x00, 0x00]); // session ID, not yet assigned
        b.extend_from_slice(payload);
        b
    }

    /// MTProto, abridged transport, first (unencrypted) message: req_pq_multi.
    fn mtproto_abridged() -> Vec<u8> {
        let mut b = vec![
            0xef, // abridged transport tag
            0x0a, // packet length in 4-byte words: 10 words = 40 bytes
        ];
        b.extend_from_slice(&[0x00; 8]); // auth_key_id 0: unencrypted message
        b.extend_from_slice(&0x6522_4a3c_0000_0004u64.to_le_bytes()); // message_id (time-based)
        b.extend_from_slice(&20u32.to_le_bytes()); // message_data_length: 20 bytes
        b.extend_from_slice(&0xbe7e_8ef1u32.to_le_bytes()); // constructor req_pq_multi
        b.extend_from_slice(&[0x3c; 16]); // nonce (int128)
        b
    }

    /// WhatsApp: Noise prologue, then the first frame (ClientHello protobuf).
    fn whatsapp_hello() -> Vec<u8> {
        let mut b = vec![
            0x57, 0x41, // "WA"
            0x06, // Noise protocol version byte
            0x03, // dictionary version
            0x00, 0x00, 0x24, // frame length: 36 bytes
            0x12, 0x22, // HandshakeMessage field 2 (clientHello), length 34
            0x0a, 0x20, // ClientHello field 1 (ephemeral key), length 32
        ];
        b.extend_from_slice(&[0x77; 32]); // ephemeral public key
        b
    }

    const XMPP_PROLOG_SINGLE: &[u8] = b"<?xml version='1.0'?><stream:stream to='example.com' \
        xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";
    const XMPP_BARE_DOUBLE: &[u8] = b"<stream:stream xmlns=\"jabber:client\" \
        xmlns:stream=\"http://etherx.jabber.org/streams\" to=\"example.com\" version=\"1.0\">";
    const XMPP_PROLOG_DOUBLE: &[u8] =
        b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<stream:stream \
        xml:lang=\"en\" to=\"example.com\" version=\"1.0\" xmlns=\"jabber:client\" \
        xmlns:stream=\"http://etherx.jabber.org/streams\">";
    const XMPP_SERVER_REPLY: &[u8] = b"<?xml version='1.0'?><stream:stream \
        xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' id='c2s_4711' \
        from='example.com' version='1.0' xml:lang='en'>";

    /// A signature fixture: `bytes` matches rule `tag` first at the prefix of length
    /// `at`, the completing atom starting at `offset`; `first_atom` is where the
    /// earliest atom of the rule starts (nothing from there on may be forwarded).
    struct Positive {
        name: &'static str,
        dir: Direction,
        bytes: Vec<u8>,
        tag: u32,
        at: usize,
        offset: usize,
        first_atom: usize,
    }

    fn positive(
        name: &'static str,
        tag: u32,
        bytes: Vec<u8>,
        at: usize,
        offset: usize,
    ) -> Positive {
        Positive {
            name,
            dir: Direction::Client,
            bytes,
            tag,
            at,
            offset,
            first_atom: 0,
        }
    }

    fn xmpp(name: &'static str, dir: Direction, tag: u32, bytes: &[u8]) -> Positive {
        let offset = find(bytes, b"jabber:client");
        Positive {
            name,
            dir,
            bytes: bytes.to_vec(),
            tag,
            at: offset + b"jabber:client".len(),
            offset,
            first_atom: find(bytes, b"<stream:stream"),
        }
    }

    fn positives() -> Vec<Positive> {
        use Direction::{Client, Server};
        let mut padded = vec![b'x'; 100];
        padded.extend_from_slice(XMPP_BARE_DOUBLE);
        vec![
            // Complete once the FLAP version (bytes 6..10) is in.
            positive("OSCAR signon", OSCAR, oscar_signon(), 10, 6),
            // Complete once the vendor ID (bytes 6..8) is in.
            positive("YMSG auth", YMSG, ymsg_auth(), 8, 6),
            // " MSNP" at 5..10 after "VER 1".
            positive("MSNP8 VER", MSNP, b"VER 1 MSNP8 CVR0\r\n".to_vec(), 10, 5),
            // " MSNP" at 6..11 after "VER 12".
            positive(
                "MSNP15 VER",
                MSNP,
                b"VER 12 MSNP15 MSNP14 CVR0\r\n".to_vec(),
                11,
                6,
            ),
            xmpp(
                "XMPP, prolog, single quotes",
                Client,
                XMPP,
                XMPP_PROLOG_SINGLE,
            ),
            xmpp(
                "XMPP, no prolog, double quotes",
                Client,
                XMPP,
                XMPP_BARE_DOUBLE,
            ),
            xmpp(
                "XMPP, prolog, double quotes",
                Client,
                XMPP,
                XMPP_PROLOG_DOUBLE,
            ),
            xmpp("XMPP after 100 benign bytes", Client, XMPP, &padded),
            xmpp("XMPP server reply", Server, XMPP_SERVER, XMPP_SERVER_REPLY),
            // "\nUSER " at 9..15, after "NICK foo\r".
            positive(
                "IRC registration",
                IRC,
                b"NICK foo\r\nUSER foo 0 * :Foo\r\n".to_vec(),
                15,
                9,
            ),
            // auth_key_id zeros at 2..10.
            positive("MTProto abridged", MTPROTO, mtproto_abridged(), 10, 2),
            positive("WhatsApp prologue", WHATSAPP, whatsapp_hello(), 4, 0),
        ]
    }

    // ---- Negative fixtures -------------------------------------------------------

    /// MySQL HandshakeResponse41, the client's first packet.
    fn mysql_handshake_response() -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&0x000f_a68du32.to_le_bytes()); // capability flags
        body.extend_from_slice(&0x0100_0000u32.to_le_bytes()); // max packet size: 16 MiB
        body.push(0x21); // character set: utf8_general_ci
        body.extend_from_slice(&[0x00; 23]); // reserved filler
        body.extend_from_slice(b"root\0"); // user name, NUL-terminated
        body.push(20); // auth response length
        body.extend_from_slice(&[0x5a; 20]); // scrambled password
        body.extend_from_slice(b"mysql_native_password\0"); // auth plugin name
        let mut packet = (body.len() as u32).to_le_bytes()[..3].to_vec(); // payload length
        packet.push(0x01); // sequence ID 1: answers the server greeting
        packet.extend(body);
        packet
    }

    /// TLS ClientHello with an SNI extension (what most CONNECT tunnels start with).
    fn tls_client_hello() -> Vec<u8> {
        let mut rng = XorShift(0x7155_3a11_0000_0001);
        let mut b = vec![
            0x16, // record type: handshake
            0x03, 0x01, // record version TLS 1.0 (as sent by TLS 1.3 clients)
            0x02, 0x00, // record length 512
            0x01, // handshake type: ClientHello
            0x00, 0x01, 0xfc, // handshake length 508
            0x03, 0x03, // client version TLS 1.2
        ];
        b.extend(rng.bytes(32)); // client random
        b.push(0x20); // session ID length 32
        b.extend(rng.bytes(32)); // session ID
        b.extend_from_slice(&[0x00, 0x04, 0x13, 0x01, 0x13, 0x02]); // two cipher suites
        b.extend_from_slice(&[0x01, 0x00]); // compression methods: null
        b.extend_from_slice(&[0x00, 0x14]); // extensions length 20
        b.extend_from_slice(&[0x00, 0x00, 0x00, 0x10]); // server_name, length 16
        b.extend_from_slice(&[0x00, 0x0e, 0x00, 0x00, 0x0b]); // list length 14, host_name, 11
        b.extend_from_slice(b"example.com");
        b
    }

    fn negatives() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            (
                "SSH banner",
                b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n".to_vec(),
            ),
            ("SMTP EHLO", b"EHLO mail.example.com\r\n".to_vec()),
            ("IMAP LOGIN", b"a001 LOGIN user pass\r\n".to_vec()),
            ("FTP USER", b"USER anonymous\r\n".to_vec()),
            ("MySQL handshake response", mysql_handshake_response()),
            ("Redis PING", b"*1\r\n$4\r\nPING\r\n".to_vec()),
            (
                "HTTP GET",
                b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec(),
            ),
            ("TLS ClientHello", tls_client_hello()),
        ]
    }

    /// Longest suffix of `buf` that is a proper prefix of some atom of `dir`: the most
    /// a stream that matches nothing may be held back by.
    fn allowed_hold(rules: &[PayloadRule], dir: Direction, buf: &[u8]) -> usize {
        let mut hold = 0;
        for atom in rules
            .iter()
            .filter(|r| r.direction == dir)
            .flat_map(|r| &r.atoms)
        {
            for k in 1..atom.bytes.len().min(buf.len() + 1) {
                if bytes_eq(&buf[buf.len() - k..], &atom.bytes[..k], atom.nocase) {
                    hold = hold.max(k);
                }
            }
        }
        hold
    }

    // ---- A naive model of the contract, for cross-checks -------------------------

    fn reference(rules: &[PayloadRule], dir: Direction, buf: &[u8]) -> Outcome {
        let len = buf.len();
        let mut best: Option<(usize, u32, usize)> = None;
        let mut alive = Vec::new();
        let mut progress = false;
        for rule in rules.iter().filter(|r| r.direction == dir) {
            let (mut dead, mut complete, mut touched) = (false, true, false);
            let mut last = (0, 0);
            for atom in &rule.atoms {
                let n = atom.bytes.len();
                match atom.anchor {
                    Anchor::At(o) if len >= o + n => {
                        touched = true;
                        if bytes_eq(&buf[o..o + n], &atom.bytes, atom.nocase) {
                            last = last.max((o + n, o));
                        } else {
                            dead = true;
                        }
                    }
                    Anchor::At(o) => {
                        complete = false;
                        if len > o {
                            touched = true;
                            dead |= !bytes_eq(&buf[o..], &atom.bytes[..len - o], atom.nocase);
                        }
                    }
                    Anchor::Within(bound) => {
                        let limit = bound.min(len);
                        let found = (0..limit.saturating_sub(n) + 1).find(|&s| {
                            s + n <= limit && bytes_eq(&buf[s..s + n], &atom.bytes, atom.nocase)
                        });
                        match found {
                            Some(s) => {
                                touched = true;
                                last = last.max((s + n, s));
                            }
                            None => {
                                complete = false;
                                dead |= len >= bound;
                            }
                        }
                    }
                }
            }
            if complete && !dead {
                let done = (last.0, rule.tag, last.1);
                best = Some(best.map_or(done, |b| b.min(done)));
            } else if !dead {
                progress |= touched;
                alive.push(rule);
            }
        }
        if let Some((_, tag, offset)) = best {
            return Outcome::Match { tag, offset };
        }
        if alive.is_empty() {
            return Outcome::NoMatch;
        }
        if progress {
            return Outcome::Pending { forward_upto: 0 };
        }
        let mut hold = 0;
        for atom in alive.iter().flat_map(|r| &r.atoms) {
            let Anchor::Within(bound) = atom.anchor else {
                continue;
            };
            let n = atom.bytes.len();
            for k in 1..n.min(len + 1) {
                let s = len - k;
                if s + n <= bound && bytes_eq(&buf[s..], &atom.bytes[..k], atom.nocase) {
                    hold = hold.max(k);
                }
            }
        }
        Outcome::Pending {
            forward_upto: len - hold,
        }
    }

    // ---- Tests --------------------------------------------------------------------

    #[test]
    fn positives_match_at_the_first_complete_prefix_and_stay_matched() {
        let m = sample_matcher();
        let mut rng = XorShift(0x5eed_0001);
        for p in positives() {
            let expected = Outcome::Match {
                tag: p.tag,
                offset: p.offset,
            };
            for len in 0..=p.bytes.len() {
                let got = m.classify(p.dir, &p.bytes[..len]);
                if len < p.at {
                    assert!(
                        matches!(got, Outcome::Pending { .. }),
                        "{}: {len} bytes gave {got:?}, want Pending",
                        p.name
                    );
                } else {
                    assert_eq!(got, expected, "{}: {len} bytes", p.name);
                }
            }
            // Whatever follows does not change the verdict.
            let mut longer = p.bytes.clone();
            longer.extend(rng.bytes(3000));
            assert_eq!(m.classify(p.dir, &longer), expected, "{} + noise", p.name);
            assert_eq!(
                m.classify(p.dir, &p.bytes),
                reference(&sample_rules(), p.dir, &p.bytes)
            );
        }
    }

    #[test]
    fn positives_never_forward_signature_bytes() {
        // Simulate the proxy: forward up to the largest forward_upto seen, whatever
        // the read sizes; nothing from the rule's first atom on may have gone out.
        let m = sample_matcher();
        let mut rng = XorShift(0x5eed_0002);
        for p in positives() {
            for round in 0..50 {
                let (mut len, mut sent) = (0, 0);
                loop {
                    len = (len + 1 + rng.below(if round == 0 { 1 } else { 24 })).min(p.bytes.len());
                    match m.classify(p.dir, &p.bytes[..len]) {
                        Outcome::Pending { forward_upto } => {
                            assert!(len < p.bytes.len(), "{}: no match at the end", p.name);
                            sent = sent.max(forward_upto);
                        }
                        Outcome::Match { tag, .. } => {
                            assert_eq!(tag, p.tag, "{}", p.name);
                            break;
                        }
                        Outcome::NoMatch => panic!("{}: NoMatch at {len} bytes", p.name),
                    }
                }
                assert!(sent <= p.first_atom, "{}: forwarded {sent} bytes", p.name);
            }
        }
    }

    #[test]
    fn benign_prefix_is_forwarded_until_the_floating_signature_starts() {
        let m = sample_matcher();
        let mut buf = vec![b'x'; 100];
        assert_eq!(
            m.classify(Direction::Client, &buf),
            Outcome::Pending { forward_upto: 100 }
        );
        buf.extend_from_slice(b"<stre");
        // "<stre" could be the start of "<stream:stream": held back.
        assert_eq!(
            m.classify(Direction::Client, &buf),
            Outcome::Pending { forward_upto: 100 }
        );
        buf.extend_from_slice(b"am:stream xmlns='jabber:cl");
        // The stream header is seen: the stream looks like XMPP, hold everything.
        assert_eq!(
            m.classify(Direction::Client, &buf),
            Outcome::Pending { forward_upto: 0 }
        );
        buf.extend_from_slice(b"ient'>");
        assert_eq!(
            m.classify(Direction::Client, &buf),
            Outcome::Match {
                tag: XMPP,
                offset: find(&buf, b"jabber:client")
            }
        );
    }

    #[test]
    fn split_floating_pattern_is_held_only_while_it_can_still_fit() {
        let m = sample_matcher();
        let mut buf = b"hello jabber:cl".to_vec();
        assert_eq!(
            m.classify(Direction::Client, &buf),
            Outcome::Pending { forward_upto: 6 }
        );
        // "<STR" may begin "<stream:stream" (nocase): held.
        buf = b"hello <STR".to_vec();
        assert_eq!(
            m.classify(Direction::Client, &buf),
            Outcome::Pending { forward_upto: 6 }
        );
        // A "<stre" starting at 247 would end at 261 > 256: it cannot count, so flows.
        buf = vec![b'.'; 247];
        buf.extend_from_slice(b"<stre");
        assert_eq!(
            m.classify(Direction::Client, &buf),
            Outcome::Pending { forward_upto: 252 }
        );
        buf = vec![b'.'; 242];
        buf.extend_from_slice(b"<stre");
        assert_eq!(
            m.classify(Direction::Client, &buf),
            Outcome::Pending { forward_upto: 242 }
        );
    }

    #[test]
    fn negatives_never_match_and_keep_flowing() {
        let m = sample_matcher();
        let rules = sample_rules();
        for dir in [Direction::Client, Direction::Server] {
            for (name, bytes) in negatives() {
                for len in 0..=bytes.len() {
                    let prefix = &bytes[..len];
                    match m.classify(dir, prefix) {
                        Outcome::Match { .. } => panic!("{name} ({dir:?}): match at {len} bytes"),
                        Outcome::NoMatch => {}
                        Outcome::Pending { forward_upto } => {
                            let held = len - forward_upto;
                            let allowed = allowed_hold(&rules, dir, prefix);
                            assert!(
                                held <= allowed,
                                "{name} ({dir:?}): {len} bytes, {held} held, at most {allowed}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn negatives_padded_past_reach_are_no_match() {
        let m = sample_matcher();
        for dir in [Direction::Client, Direction::Server] {
            let reach = m.reach(dir);
            for (name, mut bytes) in negatives() {
                bytes.resize(reach.max(bytes.len()), b'.');
                assert_eq!(
                    m.classify(dir, &bytes),
                    Outcome::NoMatch,
                    "{name} ({dir:?})"
                );
                bytes.resize(WINDOW + 100, b'.');
                assert_eq!(
                    m.classify(dir, &bytes),
                    Outcome::NoMatch,
                    "{name} ({dir:?})"
                );
            }
        }
    }

    #[test]
    fn user_first_irc_rule_holds_ftp_user_but_never_matches_it() {
        // A rule whose first atom matches the first line of another protocol holds that
        // protocol (here FTP, which then waits for the server's 331) until the rule
        // fails: a trade-off for rule authors; the caller's timeouts bound it.
        let rules = vec![rule(
            20,
            Direction::Client,
            vec![at(0, b"USER "), within(512, b"\nNICK ")],
        )];
        let m = PayloadMatcher::compile(&rules, WINDOW).expect("compiles");
        let ftp = b"USER anonymous\r\n";
        for len in 1..=ftp.len() {
            assert_eq!(
                m.classify(Direction::Client, &ftp[..len]),
                Outcome::Pending { forward_upto: 0 }
            );
        }
        let mut ftp = ftp.to_vec();
        ftp.extend_from_slice(b"PASS guest@\r\n");
        ftp.resize(512, 0);
        assert_eq!(m.classify(Direction::Client, &ftp), Outcome::NoMatch);
        let irc = b"USER foo 0 * :Foo\r\nNICK foo\r\n";
        assert_eq!(
            m.classify(Direction::Client, irc),
            Outcome::Match {
                tag: 20,
                offset: 18
            }
        );
    }

    #[test]
    fn directions_are_separate() {
        let m = sample_matcher();
        for p in positives() {
            let other = match p.dir {
                Direction::Client => Direction::Server,
                Direction::Server => Direction::Client,
            };
            let got = m.classify(other, &p.bytes);
            let same_signature = p.name.starts_with("XMPP");
            assert!(
                same_signature || !matches!(got, Outcome::Match { .. }),
                "{} matched in the {other:?} direction: {got:?}",
                p.name
            );
        }
        // The server's stream header matches the server rule, not the client one.
        assert!(matches!(
            m.classify(Direction::Server, XMPP_SERVER_REPLY),
            Outcome::Match {
                tag: XMPP_SERVER,
                ..
            }
        ));
        assert!(matches!(
            m.classify(Direction::Client, XMPP_SERVER_REPLY),
            Outcome::Match { tag: XMPP, .. }
        ));
    }

    #[test]
    fn nocase_atoms_fold_ascii_case_and_exact_atoms_do_not() {
        let m = sample_matcher();
        let upper = b"<STREAM:Stream xmlns='jabber:client'>";
        assert!(matches!(
            m.classify(Direction::Client, upper),
            Outcome::Match { tag: XMPP, .. }
        ));
        // "jabber:client" is case-sensitive: the automaton is case-insensitive for the
        // whole direction, so this checks the exact re-verification of hits.
        let mut wrong = b"<stream:stream xmlns='JABBER:CLIENT'>".to_vec();
        assert_eq!(
            m.classify(Direction::Client, &wrong),
            Outcome::Pending { forward_upto: 0 }
        );
        wrong.resize(1024, b' ');
        assert_eq!(m.classify(Direction::Client, &wrong), Outcome::NoMatch);
        // Anchored nocase atoms fold too.
        let rules = vec![PayloadRule {
            tag: 1,
            direction: Direction::Client,
            atoms: vec![Atom {
                bytes: b"hello".to_vec(),
                anchor: Anchor::At(2),
                nocase: true,
            }],
        }];
        let m = PayloadMatcher::compile(&rules, 64).expect("compiles");
        assert_eq!(
            m.classify(Direction::Client, b"..HeLLo"),
            Outcome::Match { tag: 1, offset: 2 }
        );
        assert_eq!(m.classify(Direction::Client, b"..HeLp"), Outcome::NoMatch);
    }

    #[test]
    fn anchored_prefix_holds_everything_and_untouched_offsets_let_bytes_through() {
        let m = sample_matcher();
        // A strict prefix of an At(0) atom: the stream may be that protocol.
        for prefix in [&b"VER"[..], b"*", b"NICK", b"YMS", b"\xef", b"WA\x06"] {
            assert_eq!(
                m.classify(Direction::Client, prefix),
                Outcome::Pending { forward_upto: 0 },
                "{prefix:?}"
            );
        }
        // An atom at offset 6 alone: bytes before it flow.
        let rules = vec![rule(3, Direction::Client, vec![at(6, b"ABCD")])];
        let m = PayloadMatcher::compile(&rules, 64).expect("compiles");
        let c = |buf: &[u8]| m.classify(Direction::Client, buf);
        assert_eq!(c(b"xyz"), Outcome::Pending { forward_upto: 3 });
        assert_eq!(c(b"xyzxyz"), Outcome::Pending { forward_upto: 6 });
        assert_eq!(c(b"xyzxyzAB"), Outcome::Pending { forward_upto: 0 });
        assert_eq!(c(b"xyzxyzABCD"), Outcome::Match { tag: 3, offset: 6 });
        assert_eq!(c(b"xyzxyzABCE"), Outcome::NoMatch);
        assert_eq!(c(b"xyzxyzAC"), Outcome::NoMatch);
    }

    #[test]
    fn earliest_completion_wins_then_lowest_tag_whatever_the_rule_order() {
        use Direction::Client;
        let rules = vec![
            rule(1, Client, vec![within(100, b"foo")]),
            rule(2, Client, vec![within(100, b"bar")]),
            rule(7, Client, vec![within(100, b"abc")]),
            rule(4, Client, vec![within(100, b"bc")]),
            // Completes at the end of its At atom, which comes after the floating one.
            rule(9, Client, vec![within(100, b"hi"), at(20, b"Z")]),
        ];
        let mut reversed = rules.clone();
        reversed.reverse();
        for set in [rules, reversed] {
            let m = PayloadMatcher::compile(&set, 128).expect("compiles");
            let c = |buf: &[u8]| m.classify(Client, buf);
            // "bar" ends first, although rule 1 has the lower tag.
            assert_eq!(c(b"..bar..foo"), Outcome::Match { tag: 2, offset: 2 });
            // "abc" and "bc" end together: the lower tag wins.
            assert_eq!(c(b"..abc"), Outcome::Match { tag: 4, offset: 3 });
            let mut buf = b"hi".to_vec();
            buf.resize(20, b'.');
            buf.push(b'Z');
            assert_eq!(c(&buf), Outcome::Match { tag: 9, offset: 20 });
        }
    }

    #[test]
    fn reach_and_rule_count() {
        let m = sample_matcher();
        assert_eq!(m.rule_count(), sample_rules().len());
        assert_eq!(m.reach(Direction::Client), 1024);
        assert_eq!(m.reach(Direction::Server), 1024);
        let only_client = vec![rule(1, Direction::Client, vec![at(10, b"abc")])];
        let m = PayloadMatcher::compile(&only_client, 64).expect("compiles");
        assert_eq!(m.reach(Direction::Client), 13);
        assert_eq!(m.reach(Direction::Server), 0);
        assert_eq!(m.classify(Direction::Server, b""), Outcome::NoMatch);
        let empty = PayloadMatcher::compile(&[], 64).expect("compiles");
        assert_eq!(empty.rule_count(), 0);
        assert_eq!(
            empty.classify(Direction::Client, b"anything"),
            Outcome::NoMatch
        );
    }

    #[test]
    fn compile_rejects_bad_rules() {
        use Direction::Client;
        let cases: Vec<(&str, Vec<Atom>)> = vec![
            ("no atoms", vec![]),
            ("empty pattern", vec![at(0, b"")]),
            ("empty floating pattern", vec![within(10, b"")]),
            ("Within past the window", vec![within(65, b"abc")]),
            ("At past the window", vec![at(62, b"abc")]),
            ("At offset overflow", vec![at(usize::MAX, b"abc")]),
            ("Within shorter than its pattern", vec![within(2, b"abc")]),
            ("too many atoms", (0..65).map(|i| at(i, b"a")).collect()),
        ];
        for (name, atoms) in cases {
            let rules = vec![rule(1, Client, atoms)];
            assert!(PayloadMatcher::compile(&rules, 64).is_err(), "{name}");
        }
        // The limits themselves are fine.
        let edge = vec![rule(1, Client, vec![at(61, b"abc"), within(64, b"abc")])];
        assert!(PayloadMatcher::compile(&edge, 64).is_ok());
    }

    #[test]
    fn random_buffers_never_match_and_never_panic() {
        let m = sample_matcher();
        let mut rng = XorShift(0x0123_4567_89ab_cdef);
        for _ in 0..20_000 {
            let buf = rng.bytes(64);
            for dir in [Direction::Client, Direction::Server] {
                let got = m.classify(dir, &buf);
                assert!(!matches!(got, Outcome::Match { .. }), "{buf:02x?}: {got:?}");
            }
        }
        for _ in 0..200 {
            let len = rng.below(3000);
            let buf = rng.bytes(len);
            fuzz_logic(&buf);
        }
        for _ in 0..100 {
            let buf = rng.bytes(m.reach(Direction::Client));
            assert_eq!(m.classify(Direction::Client, &buf), Outcome::NoMatch);
        }
    }

    #[test]
    fn fuzz_logic_holds_on_fixtures() {
        let mut rng = XorShift(0x0bad_cafe);
        for p in positives() {
            fuzz_logic(&p.bytes);
            let noise = rng.below(200);
            let mut noisy = rng.bytes(noise);
            noisy.extend_from_slice(&p.bytes);
            fuzz_logic(&noisy);
        }
        for (_, bytes) in negatives() {
            fuzz_logic(&bytes);
        }
        fuzz_logic(&[]);
    }

    /// Random rules over a tiny alphabet (so that patterns, partial hits and case
    /// variants occur often) against the naive model, on every prefix.
    fn cross_check(seed: u64, rounds: usize, pattern_len: (usize, usize), buf_len: usize) {
        use Direction::{Client, Server};
        let alphabet = b"abAB\x00";
        let mut rng = XorShift(seed);
        let window = buf_len;
        for _ in 0..rounds {
            let mut rules = Vec::new();
            for tag in 0..1 + rng.below(6) as u32 {
                let atoms = (0..1 + rng.below(3))
                    .map(|_| {
                        let n = pattern_len.0 + rng.below(pattern_len.1 - pattern_len.0 + 1);
                        let bytes: Vec<u8> = (0..n).map(|_| *rng.pick(alphabet)).collect();
                        let anchor = if rng.below(3) == 0 {
                            Anchor::At(rng.below(window / 4))
                        } else {
                            Anchor::Within(n + rng.below(window - n + 1))
                        };
                        Atom {
                            bytes,
                            anchor,
                            nocase: rng.below(2) == 0,
                        }
                    })
                    .collect();
                let direction = if rng.below(4) == 0 { Server } else { Client };
                rules.push(rule(tag, direction, atoms));
            }
            let m = PayloadMatcher::compile(&rules, window).expect("random rules compile");
            for _ in 0..8 {
                let buf: Vec<u8> = (0..buf_len).map(|_| *rng.pick(alphabet)).collect();
                for dir in [Client, Server] {
                    for len in 0..=buf.len() {
                        let prefix = &buf[..len];
                        assert_eq!(
                            classify_both_ways(&m, dir, prefix),
                            reference(&rules, dir, prefix),
                            "{rules:?}\n{dir:?} {prefix:?}"
                        );
                    }
                    check_prefixes(&m, dir, &buf);
                }
            }
        }
    }

    /// Classify `buf` both ways: as `classify` does (anchor index, free and gated
    /// patterns apart) and by a pass over every rule with one search for all
    /// patterns; both selections and both outcomes must agree.
    fn classify_both_ways(m: &PayloadMatcher, dir: Direction, buf: &[u8]) -> Outcome {
        let d = m.direction(dir);
        let (indexed, pass) = (d.agreeing(buf), d.agreeing_by_pass(buf));
        assert_eq!(indexed, pass, "{dir:?} {buf:02x?}");
        let by_pass = d.classify_by_pass(buf);
        let got = m.classify(dir, buf);
        assert_eq!(got, by_pass, "{dir:?} {buf:02x?}");
        got
    }

    #[test]
    fn anchor_index_agrees_with_a_pass_over_all_rules_on_built_inputs() {
        use Direction::{Client, Server};
        let nocase_at = |offset: usize, bytes: &[u8]| Atom {
            nocase: true,
            ..at(offset, bytes)
        };
        let rules = vec![
            // Keys sharing leading bytes, of 1 to more than KEY_BYTES bytes.
            rule(1, Client, vec![at(0, b"AB")]),
            rule(2, Client, vec![at(0, b"ABCDEFG")]),
            rule(3, Client, vec![at(0, b"ABCDXYZ")]),
            rule(4, Client, vec![at(0, b"A"), at(3, b"D")]),
            rule(5, Client, vec![at(0, b"ABC"), within(32, b"needle")]),
            // The same key at another offset, and case folded.
            rule(6, Client, vec![at(2, b"CDE")]),
            rule(7, Client, vec![nocase_at(0, b"abcd"), at(4, b"E")]),
            rule(8, Client, vec![nocase_at(1, b"Bc")]),
            // Key bytes 00 and FF at the ends of the packed range.
            rule(9, Client, vec![at(0, &[0x00, 0x00])]),
            rule(10, Client, vec![at(0, &[0xff, 0xff, 0xff, 0xff, 0xff])]),
            rule(11, Client, vec![at(0, &[0xff])]),
            // Unanchored, overlapping the anchored ones, one ending at the window edge.
            rule(12, Client, vec![within(64, b"CDEF")]),
            rule(13, Client, vec![within(64, b"needle"), within(64, b"eed")]),
            rule(14, Client, vec![at(58, b"edge!!")]),
            // The other direction: same keys, other tags.
            rule(20, Server, vec![at(0, b"ABCD")]),
            rule(21, Server, vec![within(64, b"ABCD")]),
            rule(22, Server, vec![nocase_at(0, b"xy"), within(64, b"CDEF")]),
        ];
        let m = PayloadMatcher::compile(&rules, 64).expect("compiles");
        let mut edge = vec![b'.'; 58];
        edge.extend_from_slice(b"edge!!");
        let mut needle_at_end = vec![b'.'; 58];
        needle_at_end.extend_from_slice(b"needle");
        let inputs: Vec<Vec<u8>> = vec![
            b"ABCDEFG".to_vec(),
            b"ABCDXYZ".to_vec(),
            b"ABCDEFGH needle".to_vec(),
            b"ABC...needle".to_vec(),
            b"abcdE".to_vec(),
            b"aBcDE".to_vec(),
            b"xbCdE".to_vec(),
            b"XYCDEF".to_vec(),
            b"ABD".to_vec(),
            vec![0x00, 0x00, 0x01],
            vec![0xff; 8],
            vec![0xff, 0xfe],
            edge,
            needle_at_end,
            b"..CDEF".to_vec(),
        ];
        for input in &inputs {
            for dir in [Client, Server] {
                for len in 0..=input.len() {
                    let prefix = &input[..len];
                    assert_eq!(
                        classify_both_ways(&m, dir, prefix),
                        reference(&rules, dir, prefix),
                        "{dir:?} {prefix:02x?}"
                    );
                }
            }
        }
        let c = |buf: &[u8]| classify_both_ways(&m, Client, buf);
        assert_eq!(c(b"AB"), Outcome::Match { tag: 1, offset: 0 });
        assert_eq!(c(b"ABCDX"), Outcome::Match { tag: 1, offset: 0 });
        assert_eq!(c(b"xBc"), Outcome::Match { tag: 8, offset: 1 });
        assert_eq!(c(&[0xff]), Outcome::Match { tag: 11, offset: 0 });
        // "CDE" at 2 (rule 6) ends before "CDEF" (rule 12).
        assert_eq!(c(b"..CDEF"), Outcome::Match { tag: 6, offset: 2 });
        assert_eq!(c(b"..xCDEF"), Outcome::Match { tag: 12, offset: 3 });
        assert_eq!(
            classify_both_ways(&m, Server, b"ABCD"),
            Outcome::Match { tag: 20, offset: 0 }
        );
    }

    #[test]
    fn anchor_index_agrees_with_a_pass_over_many_rules_sharing_keys() {
        use Direction::{Client, Server};
        // Hundreds of rules over a tiny alphabet: keys collide, share prefixes and end
        // inside the buffer's first bytes; some rules have no anchored atom at all.
        let alphabet = b"aAb\x00\xff";
        let mut rng = XorShift(0x4444);
        let window = 48;
        for round in 0..3 {
            let mut rules = Vec::new();
            for tag in 0..300u32 {
                let atoms = (0..1 + rng.below(3))
                    .map(|_| {
                        let n = 1 + rng.below(6);
                        let bytes: Vec<u8> = (0..n).map(|_| *rng.pick(alphabet)).collect();
                        let anchor = if rng.below(5) == 0 {
                            Anchor::Within(n + rng.below(window - n + 1))
                        } else {
                            Anchor::At(rng.below(6))
                        };
                        Atom {
                            bytes,
                            anchor,
                            nocase: rng.below(3) == 0,
                        }
                    })
                    .collect();
                let direction = if tag % 3 == round % 3 { Server } else { Client };
                rules.push(rule(tag, direction, atoms));
            }
            let m = PayloadMatcher::compile(&rules, window).expect("random rules compile");
            for _ in 0..15 {
                let buf: Vec<u8> = (0..window).map(|_| *rng.pick(alphabet)).collect();
                for dir in [Client, Server] {
                    for len in 0..=buf.len() {
                        let prefix = &buf[..len];
                        assert_eq!(
                            classify_both_ways(&m, dir, prefix),
                            reference(&rules, dir, prefix),
                            "{dir:?} {prefix:02x?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn matches_the_naive_model_with_single_byte_patterns() {
        // Some pattern of one byte: the automaton walks every byte.
        cross_check(0x1111, 300, (1, 3), 40);
    }

    #[test]
    fn matches_the_naive_model_with_bigram_filter() {
        // Shortest pattern 2 or 3 bytes: bigram filter.
        cross_check(0x2222, 300, (2, 4), 40);
    }

    #[test]
    fn matches_the_naive_model_with_trigram_filter_and_long_buffers() {
        // Shortest pattern 4 or more: hashed 3-gram filter with a step of up to 7.
        cross_check(0x3333, 20, (4, 9), 256);
    }
}
