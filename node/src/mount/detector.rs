//! The behaviour detector (DESIGN.md, "Trust, seals, behaviour"): a sans-IO state machine
//! fed by a read-write mount's write path with what its requests do to the volume, on
//! plaintext, in time order. It answers a [`Trip`] when the writes look like ransomware:
//! content replaced by high-entropy content (encrypted-looking) while the content it
//! replaces was not, in place or by a new file that takes an original's place (a copy
//! then a delete, or a rename over it), across several files.
//!
//! Each such *suspicious file* adds 1 to a score that decays exponentially (time
//! constant: five detector windows), so a fast attack trips within a few files and a slow
//! one (a file a minute) within a few more; benign work does not add to it at all: new
//! high-entropy files (media, archives, packs) replace nothing, text rewritten over text
//! is not high-entropy, and compressed content replaced by compressed content is no rise.
//! Overwrites, removals and renames are also counted against their running (EWMA) rate:
//! a burst of them while the score is already three quarters of the way trips sooner.
//!
//! Time comes in with each observation (nanoseconds); nothing here reads a clock, so the
//! detector runs the same in a test, a simulation and a mount.

use std::collections::{BTreeMap, VecDeque};

use forge_store::contract::DetectorThresholds;

/// Bytes of a write (or of a file's committed content) whose entropy is measured: enough
/// for a stable figure (4 KiB of random bytes measure 7.95 bits per byte), cheap in the
/// write path.
pub const ENTROPY_SAMPLE_BYTES: usize = 16 * 1024;

/// Writes shorter than this are not judged (too few bytes to tell random from text).
pub const JUDGED_WRITE_BYTES: usize = 1024;

/// Shannon entropy of `bytes`, in bits per byte (0 for none).
#[must_use]
#[allow(clippy::cast_precision_loss)]
pub fn shannon_entropy(bytes: &[u8]) -> f32 {
    if bytes.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for byte in bytes {
        counts[usize::from(*byte)] += 1;
    }
    let total = bytes.len() as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|count| **count > 0)
        .map(|count| {
            let share = f64::from(*count) / total;
            -share * share.log2()
        })
        .sum();
    #[allow(clippy::cast_possible_truncation)]
    let entropy = entropy as f32;
    entropy
}

/// What a mount's request did, as the detector sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// Bytes written over a file's committed content. `prior`: the entropy of that
    /// content (sampled once per file).
    Overwrite {
        /// The inode.
        file: u64,
        /// The written bytes' entropy.
        entropy: f32,
        /// The replaced content's.
        prior: f32,
    },
    /// Bytes written where there was no committed content (a new file, an append).
    Fresh {
        /// The inode.
        file: u64,
        /// The written bytes' entropy (None for a write too short to judge: its size
        /// still counts).
        entropy: Option<f32>,
        /// Where the write ended (the file's size is at least that now).
        end: u64,
    },
    /// A file with committed content lost its name: unlinked (`by` None) or replaced by a
    /// rename of inode `by` over it.
    Removed {
        /// The entropy of its committed content.
        prior: f32,
        /// Its size.
        size: u64,
        /// The inode renamed over it.
        by: Option<u64>,
    },
    /// A rename, and whether it changed the name's extension.
    Renamed {
        /// The inode.
        file: u64,
        /// `a.docx` → `a.docx.locked`, say.
        new_extension: bool,
    },
}

/// The detector tripped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trip {
    /// `entropy-rewrite` (enough suspicious files) or `rewrite-burst` (three quarters as
    /// many, in a burst of overwrites, removals and renames).
    pub kind: &'static str,
    /// What was seen, for a person to review.
    pub evidence: String,
}

#[derive(Debug, Default, Clone, Copy)]
struct FileMarks {
    /// Its new content so far is high-entropy (every judged fresh write was).
    high_entropy_fresh: bool,
    /// Counted as suspicious already (a file counts once).
    counted: bool,
    /// The end of its furthest write (its size, for a file written from the start).
    size: u64,
    /// Paired with a removed original already.
    paired: bool,
    /// Renamed to another extension.
    renamed: bool,
}

/// The detector of one mount.
#[derive(Debug, Clone)]
pub struct Detector {
    thresholds: DetectorThresholds,
    /// The decayed count of suspicious files, as of `score_ns`.
    score: f64,
    score_ns: i64,
    /// The last high-entropy write of new content: when, and to which file (a removal of
    /// a low-entropy original of that file's size moments later pairs with it).
    last_fresh_high: Option<(i64, u64)>,
    files: BTreeMap<u64, FileMarks>,
    /// Destructive operations (overwrites of committed content, removals, renames): their
    /// rate in the current second, and its long-run average.
    current_second: Option<i64>,
    current_count: f64,
    baseline_per_second: f64,
    /// The baseline this detector started from.
    baseline_initial: f64,
    /// Suspicious files so far, and the last few of them, for the evidence.
    suspicious_total: u64,
    last_reasons: VecDeque<String>,
    tripped: bool,
}

/// How soon after writing its copy ransomware removes the original (copy then delete).
const COPY_PAIRING_NS: i64 = 10_000_000_000;

/// How much decay is forgiven when the score is compared with the threshold.
const SCORE_SLACK: f64 = 0.1;
/// The baseline's smoothing per second (a time constant of about 5 minutes).
const BASELINE_SMOOTHING: f64 = 1.0 / 300.0;
/// The baseline never counts as quieter than this (destructive operations per second):
/// a quiet volume's first burst is not infinitely many times its average.
const BASELINE_FLOOR: f64 = 1.0;

impl Detector {
    /// A detector with these thresholds.
    #[must_use]
    pub fn new(thresholds: DetectorThresholds) -> Self {
        Self {
            thresholds,
            score: 0.0,
            score_ns: 0,
            last_fresh_high: None,
            files: BTreeMap::new(),
            current_second: None,
            current_count: 0.0,
            baseline_per_second: 0.0,
            baseline_initial: 0.0,
            suspicious_total: 0,
            last_reasons: VecDeque::new(),
            tripped: false,
        }
    }

    /// This detector, starting from a volume's learned rate of destructive operations
    /// (per second, as [`Detector::baseline_per_second`] gave it at an earlier mount's
    /// end) instead of none.
    #[must_use]
    pub fn with_baseline(mut self, per_second: f64) -> Self {
        if per_second.is_finite() && per_second >= 0.0 {
            self.baseline_per_second = per_second;
        }
        self.baseline_initial = self.baseline_per_second;
        self
    }

    /// The learned rate of destructive operations per second (what the volume keeps for
    /// its next mount). A mount that saw no destructive operation leaves it as it came.
    #[must_use]
    pub fn baseline_per_second(&self) -> f64 {
        if self.current_second.is_none() {
            self.baseline_initial
        } else {
            self.baseline_per_second
        }
    }

    fn window_ns(&self) -> i64 {
        i64::from(self.thresholds.window_seconds) * 1_000_000_000
    }

    fn high(&self, entropy: f32) -> bool {
        entropy >= self.thresholds.max_entropy_bits
    }

    /// Whether `prior` content replaced by high-entropy content is a rise worth noting.
    fn rises_from(&self, prior: f32) -> bool {
        self.thresholds.max_entropy_bits - prior >= self.thresholds.entropy_rise_bits
    }

    /// Whether a removal now would be judged (so the caller samples the removed file's
    /// content only then): a high-entropy new file was written within the window, or the
    /// removal is a rename over.
    #[must_use]
    pub fn wants_removed_prior(&self, now_ns: i64, by: Option<u64>) -> bool {
        !self.tripped
            && (by.is_some_and(|file| {
                self.files
                    .get(&file)
                    .is_some_and(|marks| marks.high_entropy_fresh)
            }) || self
                .last_fresh_high
                .is_some_and(|(time, _)| now_ns - time <= self.window_ns()))
    }

    /// Whether an overwrite of `file` would still be judged (a file counts once).
    #[must_use]
    pub fn judges_overwrite_of(&self, file: u64) -> bool {
        !self.tripped && !self.files.get(&file).is_some_and(|marks| marks.counted)
    }

    /// Feeds one observation at `now_ns`; answers a trip once (then nothing more).
    pub fn observe(&mut self, now_ns: i64, observation: &Observation) -> Option<Trip> {
        if self.tripped {
            return None;
        }
        self.decay_to(now_ns);
        match *observation {
            Observation::Overwrite {
                file,
                entropy,
                prior,
            } => {
                self.count_destructive(now_ns);
                if self.high(entropy) && self.rises_from(prior) {
                    self.suspicious(
                        file,
                        format!(
                            "inode {file} rewritten in place: {prior:.2} -> {entropy:.2} bits/byte"
                        ),
                    );
                }
            }
            Observation::Fresh { file, entropy, end } => {
                let marks = self.files.entry(file).or_default();
                marks.size = marks.size.max(end);
                let Some(entropy) = entropy else {
                    return self.verdict();
                };
                if entropy >= self.thresholds.max_entropy_bits {
                    marks.high_entropy_fresh = true;
                    self.last_fresh_high = Some((now_ns, file));
                } else {
                    marks.high_entropy_fresh = false;
                }
            }
            Observation::Removed { prior, size, by } => {
                self.count_destructive(now_ns);
                let replaced_by_high = by.is_some_and(|file| {
                    self.files
                        .get(&file)
                        .is_some_and(|marks| marks.high_entropy_fresh)
                });
                // A copy: the high-entropy new file written last, moments ago, of the
                // removed one's size (encryption keeps sizes, give or take a header or a
                // padding block), not paired yet. (A looser match pairs bulk work by
                // chance: git's checkouts, rsync --delete after compressed files.)
                let copy = if by.is_none() {
                    self.last_fresh_high
                        .filter(|(time, _)| now_ns - time <= COPY_PAIRING_NS)
                        .map(|(_, file)| file)
                        .filter(|file| {
                            self.files.get(file).is_some_and(|marks| {
                                !marks.paired
                                    && marks.size >= size
                                    && marks.size <= size + size / 32 + 512
                            })
                        })
                } else {
                    None
                };
                let after_high_copy = copy.is_some();
                if (replaced_by_high || after_high_copy) && self.rises_from(prior) {
                    // The suspicious file is the original: count it under a key of its
                    // own (the replacing inode, or the time for an unlink).
                    let key = by.unwrap_or(u64::MAX - self.suspicious_total);
                    self.suspicious(
                        key,
                        format!(
                            "a {prior:.2}-bits/byte file {} after a high-entropy copy",
                            if by.is_some() {
                                "replaced by a rename"
                            } else {
                                "deleted"
                            }
                        ),
                    );
                    if let Some(copy) = copy {
                        // One copy pairs with one removal.
                        self.files.entry(copy).or_default().paired = true;
                    }
                }
            }
            Observation::Renamed {
                file,
                new_extension,
            } => {
                self.count_destructive(now_ns);
                if new_extension {
                    self.files.entry(file).or_default().renamed = true;
                }
            }
        }
        self.verdict()
    }

    fn decay_to(&mut self, now_ns: i64) {
        if now_ns > self.score_ns {
            #[allow(clippy::cast_precision_loss)]
            let elapsed = (now_ns - self.score_ns) as f64 / 1e9;
            let time_constant = 5.0 * f64::from(self.thresholds.window_seconds);
            self.score *= (-elapsed / time_constant).exp();
            self.score_ns = now_ns;
        }
    }

    fn count_destructive(&mut self, now_ns: i64) {
        let second = now_ns.div_euclid(1_000_000_000);
        match self.current_second {
            Some(current) if current == second => {}
            Some(current) => {
                // Close the seconds since: the last one at its count, the empty ones at
                // zero.
                #[allow(clippy::cast_precision_loss)]
                let quiet = (second - current - 1).clamp(0, 3_600) as f64;
                self.baseline_per_second +=
                    BASELINE_SMOOTHING * (self.current_count - self.baseline_per_second);
                self.baseline_per_second *= (1.0 - BASELINE_SMOOTHING).powf(quiet);
                self.current_second = Some(second);
                self.current_count = 0.0;
            }
            // The first destructive operation of this mount: the baseline is the one it
            // started from (the time before the mount was no quiet time of this volume).
            None => self.current_second = Some(second),
        }
        self.current_count += 1.0;
    }

    fn suspicious(&mut self, file: u64, reason: String) {
        let marks = self.files.entry(file).or_default();
        if marks.counted {
            return;
        }
        marks.counted = true;
        let weight = if marks.renamed { 1.5 } else { 1.0 };
        self.score += weight;
        self.suspicious_total += 1;
        self.last_reasons.push_back(reason);
        if self.last_reasons.len() > 5 {
            self.last_reasons.pop_front();
        }
    }

    fn verdict(&mut self) -> Option<Trip> {
        let needed = f64::from(self.thresholds.suspicious_files);
        let burst = self.current_count
            >= f64::from(self.thresholds.rate_factor)
                * self.baseline_per_second.max(BASELINE_FLOOR);
        // Files close together count whole: a tenth of a file of decay is forgiven.
        let kind = if self.score + SCORE_SLACK >= needed {
            "entropy-rewrite"
        } else if burst && self.score + SCORE_SLACK >= (needed * 0.75).max(2.0) {
            "rewrite-burst"
        } else {
            return None;
        };
        self.tripped = true;
        Some(Trip {
            kind,
            evidence: format!(
                "{} suspicious file(s) (score {:.1} of {needed}; {:.0} destructive operations \
                 this second, baseline {:.2}/s); last: {}",
                self.suspicious_total,
                self.score,
                self.current_count,
                self.baseline_per_second,
                self.last_reasons
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::test_support::pseudo_random as random;

    const SECOND: i64 = 1_000_000_000;

    fn text(len: usize) -> Vec<u8> {
        b"It was the best of times, it was the worst of times. "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    #[test]
    fn entropy_tells_random_from_text() {
        assert_eq!(shannon_entropy(&[]), 0.0);
        assert_eq!(shannon_entropy(&[7; 1000]), 0.0);
        assert!(shannon_entropy(&random(4096, 1)) > 7.9);
        assert!(shannon_entropy(&text(4096)) < 4.5);
        assert!((shannon_entropy(&[0, 1, 0, 1]) - 1.0).abs() < 1e-6);
    }

    fn in_place(detector: &mut Detector, file: u64, at: i64) -> Option<Trip> {
        detector.observe(
            at,
            &Observation::Overwrite {
                file,
                entropy: shannon_entropy(&random(4096, file)),
                prior: shannon_entropy(&text(4096)),
            },
        )
    }

    #[test]
    fn a_fast_in_place_attack_trips_at_the_threshold() {
        let mut detector = Detector::new(DetectorThresholds::default());
        for file in 1..4 {
            assert_eq!(
                in_place(&mut detector, file, file.cast_signed() * SECOND / 10),
                None
            );
        }
        let trip = in_place(&mut detector, 4, SECOND / 2).unwrap();
        assert_eq!(trip.kind, "entropy-rewrite");
        assert!(
            trip.evidence.starts_with("4 suspicious file(s)"),
            "{}",
            trip.evidence
        );
        // Once.
        assert_eq!(in_place(&mut detector, 5, SECOND), None);
    }

    #[test]
    fn a_slow_attack_trips_within_a_few_more_files() {
        let mut detector = Detector::new(DetectorThresholds::default());
        let mut lost = 0;
        for file in 1..=20 {
            lost += 1;
            if in_place(&mut detector, file, file.cast_signed() * 60 * SECOND).is_some() {
                break;
            }
        }
        assert!(lost <= 6, "{lost} files before the trip");
    }

    #[test]
    fn copy_then_delete_and_rename_over_trip_too() {
        let mut detector = Detector::new(DetectorThresholds::default());
        let mut tripped = None;
        for file in 1..=10u64 {
            let at = file.cast_signed() * SECOND;
            detector.observe(
                at,
                &Observation::Fresh {
                    file: 100 + file,
                    entropy: Some(7.96),
                    end: 20_000,
                },
            );
            assert!(detector.wants_removed_prior(at, None));
            tripped = detector.observe(
                at,
                &Observation::Removed {
                    prior: 4.1,
                    size: 20_000,
                    by: None,
                },
            );
            if tripped.is_some() {
                assert_eq!(file, 4);
                break;
            }
        }
        assert!(tripped.is_some());

        let mut detector = Detector::new(DetectorThresholds::default());
        for file in 1..=4u64 {
            let at = file.cast_signed() * SECOND;
            detector.observe(
                at,
                &Observation::Fresh {
                    file,
                    entropy: Some(7.96),
                    end: 5_000,
                },
            );
            let trip = detector.observe(
                at,
                &Observation::Removed {
                    prior: 4.1,
                    size: 5_000,
                    by: Some(file),
                },
            );
            assert_eq!(trip.is_some(), file == 4);
        }
    }

    #[test]
    fn benign_work_does_not_trip() {
        let mut detector = Detector::new(DetectorThresholds::default());
        let mut at = 0;
        for file in 1..=2_000u64 {
            at += SECOND / 100;
            // Copying media and archives: new high-entropy files replace nothing.
            assert_eq!(
                detector.observe(
                    at,
                    &Observation::Fresh {
                        file,
                        entropy: Some(7.99),
                        end: 1 << 20
                    }
                ),
                None
            );
            // git gc: compressed loose objects deleted after a pack is written.
            assert!(detector.wants_removed_prior(at, None));
            assert_eq!(
                detector.observe(
                    at,
                    &Observation::Removed {
                        prior: 7.6,
                        size: 1 << 20,
                        by: None
                    }
                ),
                None
            );
            // Documents deleted after media were copied in (other sizes).
            assert_eq!(
                detector.observe(
                    at,
                    &Observation::Removed {
                        prior: 4.2,
                        size: 30_000,
                        by: None
                    }
                ),
                None
            );
            // A database overwriting pages with low-entropy content.
            assert_eq!(
                detector.observe(
                    at,
                    &Observation::Overwrite {
                        file: 10_000,
                        entropy: 3.0,
                        prior: 3.2
                    }
                ),
                None
            );
            // rsync: a temporary file renamed over its original, same content.
            detector.observe(
                at,
                &Observation::Fresh {
                    file: 20_000 + file,
                    entropy: Some(4.2),
                    end: 30_000,
                },
            );
            assert_eq!(
                detector.observe(
                    at,
                    &Observation::Removed {
                        prior: 4.2,
                        size: 30_000,
                        by: Some(20_000 + file)
                    }
                ),
                None
            );
            // Renames to other extensions (a build's outputs).
            assert_eq!(
                detector.observe(
                    at,
                    &Observation::Renamed {
                        file,
                        new_extension: true
                    }
                ),
                None
            );
        }
    }

    /// The rate a volume's earlier mounts learned carries over: what is a burst on a
    /// quiet volume is ordinary on a busy one.
    #[test]
    fn a_learned_baseline_carries_over_to_the_next_mount() {
        let burst_of_three = |detector: &mut Detector| {
            let at = 1_000 * SECOND;
            let mut trip = None;
            for file in 10..13 {
                trip = trip.or(in_place(detector, file, at));
                for _ in 0..5 {
                    trip = trip.or(detector.observe(
                        at,
                        &Observation::Renamed {
                            file,
                            new_extension: false,
                        },
                    ));
                }
            }
            trip
        };
        let quiet = Detector::new(DetectorThresholds::default());
        assert_eq!(quiet.baseline_per_second(), 0.0);
        assert_eq!(
            burst_of_three(&mut quiet.clone()).unwrap().kind,
            "rewrite-burst"
        );
        // A mount of a busy volume: ten destructive operations a second for ten minutes.
        let mut busy = Detector::new(DetectorThresholds::default());
        for second in 0..600 {
            for _ in 0..10 {
                busy.observe(
                    second * SECOND,
                    &Observation::Renamed {
                        file: 1,
                        new_extension: false,
                    },
                );
            }
        }
        let learned = busy.baseline_per_second();
        assert!(learned > 8.0 && learned <= 10.0, "{learned}");
        // The next mount starts from it; one that sees nothing destructive keeps it.
        let next = Detector::new(DetectorThresholds::default()).with_baseline(learned);
        assert_eq!(next.baseline_per_second(), learned);
        assert_eq!(burst_of_three(&mut next.clone()), None);
        // A baseline that is not a rate is ignored.
        let odd = Detector::new(DetectorThresholds::default()).with_baseline(f64::NAN);
        assert_eq!(odd.baseline_per_second(), 0.0);
    }

    #[test]
    fn a_burst_of_destructive_operations_trips_sooner() {
        let thresholds = DetectorThresholds {
            suspicious_files: 4,
            ..DetectorThresholds::default()
        };
        let mut detector = Detector::new(thresholds);
        // A quiet baseline, then 3 suspicious files within a burst of renames.
        for second in 0..600 {
            detector.observe(
                second * SECOND,
                &Observation::Renamed {
                    file: 1,
                    new_extension: false,
                },
            );
        }
        let at = 601 * SECOND;
        let mut trip = None;
        for file in 10..13 {
            trip = trip.or(in_place(&mut detector, file, at));
            for _ in 0..5 {
                trip = trip.or(detector.observe(
                    at,
                    &Observation::Renamed {
                        file,
                        new_extension: true,
                    },
                ));
            }
        }
        assert_eq!(trip.unwrap().kind, "rewrite-burst");
    }
}
