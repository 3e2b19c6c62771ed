//! Time and randomness, the two inputs a deterministic run must control. The vault reads
//! both only through [`Clock`] and [`Randomness`]; production passes [`SystemClock`] and
//! [`OsRandomness`], tests and the simulator pass seeded ones. The wall clock is read in
//! one place, [`now_ns`] (clippy bans `SystemTime::now` elsewhere).

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use forge_crypto::Cid;

/// Nanoseconds since the Unix epoch (0 if the clock is before it).
#[must_use]
#[allow(clippy::disallowed_methods)] // The one sanctioned read of the system clock.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX)
        })
}

/// Where the vault gets the time (commit times, mtimes of new entries, record times).
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Nanoseconds since the Unix epoch.
    fn now_ns(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> i64 {
        now_ns()
    }
}

/// A clock for tests and simulation: starts at a given time and moves a fixed step at
/// every read, so two runs read the same times in the same order.
#[derive(Debug)]
pub struct SteppingClock {
    next_ns: AtomicI64,
    step_ns: i64,
}

impl SteppingClock {
    /// A clock whose first reading is `start_ns`, each later one `step_ns` more.
    #[must_use]
    pub fn new(start_ns: i64, step_ns: i64) -> Self {
        Self {
            next_ns: AtomicI64::new(start_ns),
            step_ns,
        }
    }

    /// Steps the clock by `by_ns` (negative: back), as an operator or NTP setting a wrong
    /// clock right does: later readings go on from there.
    pub fn jump(&self, by_ns: i64) {
        self.next_ns.fetch_add(by_ns, Ordering::Relaxed);
    }
}

impl Clock for SteppingClock {
    fn now_ns(&self) -> i64 {
        self.next_ns.fetch_add(self.step_ns, Ordering::Relaxed)
    }
}

/// Where the vault gets random bytes (ids, keys, nonces of envelopes, signing randomness).
pub trait Randomness: Send + Sync + std::fmt::Debug {
    /// Fills `bytes`.
    ///
    /// # Errors
    /// [`forge_crypto::CryptoError::Randomness`] when the source fails.
    fn fill(&self, bytes: &mut [u8]) -> forge_crypto::Result<()>;
}

/// The operating system's random number generator (what `forge` uses).
#[derive(Debug, Clone, Copy, Default)]
pub struct OsRandomness;

impl Randomness for OsRandomness {
    fn fill(&self, bytes: &mut [u8]) -> forge_crypto::Result<()> {
        forge_crypto::fill_random(bytes)
    }
}

/// Deterministic bytes from a seed: BLAKE3 of (seed, counter) blocks. For tests and the
/// simulator only: anyone who knows the seed knows every key it produced.
#[derive(Debug)]
pub struct SeededRandomness {
    seed: u64,
    counter: Mutex<u64>,
}

impl SeededRandomness {
    /// A stream determined by `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            counter: Mutex::new(0),
        }
    }
}

impl Randomness for SeededRandomness {
    fn fill(&self, bytes: &mut [u8]) -> forge_crypto::Result<()> {
        let mut counter = self
            .counter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for block in bytes.chunks_mut(32) {
            let mut input = *b"forge-vault seeded randomness v1\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
            input[32..40].copy_from_slice(&self.seed.to_le_bytes());
            input[40..48].copy_from_slice(&counter.to_le_bytes());
            *counter += 1;
            let digest = Cid::of(&input);
            block.copy_from_slice(&digest.as_bytes()[..block.len()]);
        }
        Ok(())
    }
}

/// `N` random bytes from `randomness`.
///
/// # Errors
/// As [`Randomness::fill`].
pub fn random_array<const N: usize>(randomness: &dyn Randomness) -> forge_crypto::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    randomness.fill(&mut bytes)?;
    Ok(bytes)
}

/// A timestamp usable in a branch name: `20261128T224501Z`.
#[must_use]
pub fn format_compact_utc_time(time_ns: i64) -> String {
    format_utc_time(time_ns).replace(['-', ':'], "")
}

/// `2026-11-28T19:03:09Z` from nanoseconds since the epoch (UTC, proleptic Gregorian).
#[must_use]
pub fn format_utc_time(time_ns: i64) -> String {
    let seconds = time_ns.div_euclid(1_000_000_000);
    let (days, second_of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// Nanoseconds since the epoch of `YYYY-MM-DD` (midnight UTC) or `YYYY-MM-DDTHH:MM:SSZ`,
/// what [`format_utc_time`] writes.
///
/// # Errors
/// A reason naming the form expected.
pub fn parse_utc_time(text: &str) -> Result<i64, String> {
    let wrong =
        || format!("{text:?} is not a date: write YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC)");
    let (date, time) = match text.split_once('T') {
        Some((date, time)) => (date, Some(time.strip_suffix('Z').ok_or_else(wrong)?)),
        None => (text, None),
    };
    let number = |part: &str, digits: usize| -> Result<i64, String> {
        if part.len() != digits || !part.bytes().all(|byte| byte.is_ascii_digit()) {
            return Err(wrong());
        }
        part.parse().map_err(|_| wrong())
    };
    let mut parts = date.split('-');
    let (Some(year), Some(month), Some(day), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(wrong());
    };
    let (year, month, day) = (number(year, 4)?, number(month, 2)?, number(day, 2)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let days_in_month = usize::try_from(month - 1)
        .ok()
        .and_then(|index| month_days.get(index))
        .ok_or_else(wrong)?;
    if day < 1 || day > *days_in_month {
        return Err(wrong());
    }
    let second_of_day = match time {
        None => 0,
        Some(time) => {
            let mut parts = time.split(':');
            let (Some(hour), Some(minute), Some(second), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(wrong());
            };
            let (hour, minute, second) = (number(hour, 2)?, number(minute, 2)?, number(second, 2)?);
            if hour > 23 || minute > 59 || second > 59 {
                return Err(wrong());
            }
            hour * 3600 + minute * 60 + second
        }
    };
    // Howard Hinnant's days_from_civil.
    let shifted_year = if month <= 2 { year - 1 } else { year };
    let era = shifted_year.div_euclid(400);
    let year_of_era = shifted_year - era * 400;
    let month_index = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Ok((days * 86_400 + second_of_day) * 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_parse_what_they_print() {
        for ns in [
            0,
            1_764_000_000_000_000_000,
            951_782_400_000_000_000,
            4_102_444_799_000_000_000,
        ] {
            assert_eq!(parse_utc_time(&format_utc_time(ns)).unwrap(), ns);
        }
        assert_eq!(
            parse_utc_time("2027-01-01").unwrap(),
            parse_utc_time("2027-01-01T00:00:00Z").unwrap()
        );
        assert_eq!(
            format_utc_time(parse_utc_time("2024-02-29").unwrap()),
            "2024-02-29T00:00:00Z"
        );
        for bad in [
            "2023-02-29",
            "2027-13-01",
            "2027-1-01",
            "tomorrow",
            "2027-01-01T25:00:00Z",
            "2027-01-01T10:00:00",
            "",
        ] {
            assert!(
                parse_utc_time(bad).unwrap_err().contains("YYYY-MM-DD"),
                "{bad}"
            );
        }
    }

    #[test]
    fn seeded_randomness_repeats_for_a_seed_and_differs_between_seeds() {
        let a: [u8; 70] = random_array(&SeededRandomness::new(1)).unwrap();
        let b: [u8; 70] = random_array(&SeededRandomness::new(1)).unwrap();
        let c: [u8; 70] = random_array(&SeededRandomness::new(2)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let stream = SeededRandomness::new(1);
        let first: [u8; 32] = random_array(&stream).unwrap();
        let second: [u8; 32] = random_array(&stream).unwrap();
        assert_ne!(first, second);
    }

    #[test]
    fn the_stepping_clock_moves_by_its_step() {
        let clock = SteppingClock::new(1_000, 10);
        assert_eq!((clock.now_ns(), clock.now_ns()), (1_000, 1_010));
    }

    #[test]
    fn times_format_as_utc_calendar_dates() {
        assert_eq!(format_utc_time(0), "1970-01-01T00:00:00Z");
        // 2024-02-29 (a leap day) 23:59:59 and one nanosecond short of the next second.
        assert_eq!(
            format_utc_time(1_709_251_199_999_999_999),
            "2024-02-29T23:59:59Z"
        );
        assert_eq!(format_utc_time(-1), "1969-12-31T23:59:59Z");
        assert_eq!(
            format_compact_utc_time(1_764_370_989_000_000_000),
            "20251128T230309Z"
        );
    }
}
