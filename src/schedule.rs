//! When a policy exception applies: `[[policy.exceptions]] schedule` in its
//! `timezone`.
//!
//! One entry of `schedule` (day names in any case):
//!
//! ```text
//! ENTRY  = DAYS | WINDOW | DAYS " " WINDOW
//! DAYS   = SPAN ("," SPAN)*
//! SPAN   = DAY | DAY "-" DAY            "Mon-Fri"; "Fri-Mon" wraps: Fri, Sat, Sun, Mon
//! DAY    = Mon | Tue | Wed | Thu | Fri | Sat | Sun
//! WINDOW = HH:MM "-" HH:MM              00:00 to 23:59; the end may also be 24:00
//! ```
//!
//! - Days alone: those whole days, 00:00 to 24:00 local time.
//! - A window alone: every day.
//! - A window whose end is after its start: from the start (included) to the
//!   end (excluded) on each day named.
//! - A window whose end is before its start crosses midnight: it starts on
//!   each day named and ends on the next day, so `Fri 22:00-02:00` runs from
//!   Friday 22:00 to Saturday 02:00 (and not on Friday from 00:00 to 02:00).
//! - A window whose start and end are equal is an error (days alone mean the
//!   whole day).
//!
//! Entries are OR'ed: the schedule holds when any entry does. Times are wall
//! clock times in the time zone (an IANA name, from the tz database built
//! into the binary, so no system tzdata is needed): `12:00-13:00` is noon to
//! one whatever the offset, also on the days daylight saving time starts or
//! ends. A window inside the hour that a spring change skips never occurs
//! that day; one inside the hour a fall change repeats holds through both.
use std::fmt;

use jiff::tz::TimeZone;
use jiff::Timestamp;

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const MINUTES_PER_DAY: u16 = 24 * 60;

/// One entry: a set of days (bit 0 Monday .. bit 6 Sunday) and a window in
/// minutes since local midnight. `start < end`: within the day;
/// `start > end`: from `start` on a named day to `end` the next day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    days: u8,
    start: u16,
    end: u16,
}

impl Entry {
    fn holds(&self, day: u8, minute: u16) -> bool {
        let on = |d: u8| self.days & (1 << d) != 0;
        if self.start < self.end {
            on(day) && self.start <= minute && minute < self.end
        } else {
            (on(day) && minute >= self.start) || (on((day + 6) % 7) && minute < self.end)
        }
    }
}

/// A parsed `schedule` with its time zone.
#[derive(Clone)]
pub struct Schedule {
    tz: TimeZone,
    entries: Box<[Entry]>,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schedule")
            .field("timezone", &self.tz.iana_name().unwrap_or("-"))
            .field("entries", &self.entries)
            .finish()
    }
}

impl Schedule {
    /// A schedule from its entries and time zone name; the error says which
    /// entry (or the zone) is wrong and why.
    pub fn new(entries: &[String], timezone: &str) -> Result<Schedule, ScheduleError> {
        let tz = time_zone(timezone).map_err(ScheduleError::TimeZone)?;
        if entries.is_empty() {
            return Err(ScheduleError::Empty);
        }
        let entries = entries
            .iter()
            .map(|e| parse_entry(e).map_err(|m| ScheduleError::Entry(e.clone(), m)))
            .collect::<Result<Box<[Entry]>, _>>()?;
        Ok(Schedule { tz, entries })
    }

    /// Does the schedule hold at this moment?
    pub fn holds(&self, at: Timestamp) -> bool {
        let local = self.tz.to_datetime(at);
        // 0 (Monday) to 6 (Sunday).
        let day = local.weekday().to_monday_zero_offset() as u8;
        let minute = local.hour() as u16 * 60 + local.minute() as u16;
        self.entries.iter().any(|e| e.holds(day, minute))
    }

    /// The IANA name of the time zone.
    pub fn timezone(&self) -> &str {
        self.tz.iana_name().unwrap_or("-")
    }
}

/// What is wrong with a schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleError {
    /// The time zone name, and why it is refused.
    TimeZone(String),
    /// An entry as written, and what is wrong with it.
    Entry(String, String),
    /// `schedule = []`.
    Empty,
}

impl fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScheduleError::TimeZone(m) => f.write_str(m),
            ScheduleError::Entry(e, m) => write!(f, "`{e}`: {m}"),
            ScheduleError::Empty => f.write_str(
                "an empty schedule never holds; leave `schedule` out for an exception that always applies",
            ),
        }
    }
}

/// An IANA time zone of the built-in database (`UTC` included).
pub fn time_zone(name: &str) -> Result<TimeZone, String> {
    let refused =
        || format!("`{name}` is not an IANA time zone name (such as \"Europe/Berlin\" or \"UTC\")");
    if name.trim().is_empty() || name.trim() != name {
        return Err(refused());
    }
    match TimeZone::get(name) {
        Ok(tz) if !tz.is_unknown() => Ok(tz),
        _ => Err(refused()),
    }
}

fn parse_entry(text: &str) -> Result<Entry, String> {
    let mut words = text.split_whitespace();
    let (first, second) = (words.next(), words.next());
    if words.next().is_some() {
        return Err("expected days, a time window, or days then a time window \
             (e.g. \"Mon-Fri 12:00-13:00\")"
            .into());
    }
    let (days, window) = match (first, second) {
        (None, _) => return Err("empty entry".into()),
        (Some(w), None) if w.contains(':') => (0x7f, Some(w)),
        (Some(d), None) => (parse_days(d)?, None),
        (Some(d), Some(w)) => (parse_days(d)?, Some(w)),
    };
    let (start, end) = match window {
        None => (0, MINUTES_PER_DAY),
        Some(w) => parse_window(w)?,
    };
    Ok(Entry { days, start, end })
}

fn parse_day(name: &str) -> Result<u8, String> {
    let lower = name.to_ascii_lowercase();
    DAY_NAMES
        .iter()
        .position(|d| *d == lower)
        .map(|i| i as u8)
        .ok_or_else(|| format!("`{name}` is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun)"))
}

fn parse_days(text: &str) -> Result<u8, String> {
    let mut days = 0u8;
    for span in text.split(',') {
        match span.split_once('-') {
            None => days |= 1 << parse_day(span)?,
            Some((from, to)) => {
                let (mut d, to) = (parse_day(from)?, parse_day(to)?);
                loop {
                    days |= 1 << d;
                    if d == to {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
        }
    }
    Ok(days)
}

/// `HH:MM`, two digits each; `24:00` only where `end_of_day`.
fn parse_time(text: &str, end_of_day: bool) -> Result<u16, String> {
    let bad = || format!("`{text}` is not a time HH:MM (00:00 to 23:59)");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    let two_digits = |s: &str| s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit());
    if !two_digits(h) || !two_digits(m) {
        return Err(bad());
    }
    let (h, m) = (
        h.parse::<u16>().map_err(|_| bad())?,
        m.parse::<u16>().map_err(|_| bad())?,
    );
    match (h, m) {
        (24, 0) if end_of_day => Ok(MINUTES_PER_DAY),
        (0..=23, 0..=59) => Ok(h * 60 + m),
        _ => Err(bad()),
    }
}

fn parse_window(text: &str) -> Result<(u16, u16), String> {
    let (start, end) = text
        .split_once('-')
        .ok_or_else(|| format!("`{text}` is not a time window HH:MM-HH:MM"))?;
    let (start, end) = (parse_time(start, false)?, parse_time(end, true)?);
    if start == end {
        return Err("the window starts where it ends; name the days alone for whole days".into());
    }
    Ok((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn schedule(entries: &[&str], tz: &str) -> Schedule {
        let entries: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        Schedule::new(&entries, tz).unwrap_or_else(|e| panic!("{entries:?}: {e}"))
    }

    #[test]
    fn days_parse_as_single_days_ranges_wraps_and_lists() {
        let days = |s: &str| parse_days(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(days("Mon"), 0b000_0001);
        assert_eq!(days("sun"), 0b100_0000);
        assert_eq!(days("Mon-Fri"), 0b001_1111);
        assert_eq!(days("Sat-Sun"), 0b110_0000);
        assert_eq!(days("Fri-Mon"), 0b111_0001);
        assert_eq!(days("Sun-Sat"), 0x7f);
        assert_eq!(days("Wed-Wed"), 0b000_0100);
        assert_eq!(days("Mon,Wed,Fri"), 0b001_0101);
        assert_eq!(days("MON-TUE,sat"), 0b010_0011);
        for bad in [
            "",
            "Monday",
            "Mo",
            "Mon-",
            "-Fri",
            "Mon--Fri",
            "Mon,",
            "Mon-Tue-Wed",
        ] {
            assert!(parse_days(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn entries_parse_and_bad_ones_say_why() {
        let e = |s: &str| parse_entry(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(
            e("Mon-Fri 12:00-13:00"),
            Entry {
                days: 0b001_1111,
                start: 720,
                end: 780
            }
        );
        assert_eq!(
            e("Sat-Sun"),
            Entry {
                days: 0b110_0000,
                start: 0,
                end: 1440
            }
        );
        assert_eq!(
            e("22:00-06:00"),
            Entry {
                days: 0x7f,
                start: 1320,
                end: 360
            }
        );
        assert_eq!(e("  Fri   18:00-24:00 ").end, 1440);
        for (bad, says) in [
            ("", "empty"),
            ("Mon-Fri 12:00-13:00 extra", "expected"),
            ("Mon-Fri 12:00", "window"),
            ("Mon-Fri 12-13", "HH:MM"),
            ("Mon-Fri 25:00-26:00", "HH:MM"),
            ("Mon-Fri 12:60-13:00", "HH:MM"),
            ("Mon-Fri 1:00-13:00", "HH:MM"),
            ("Mon-Fri 24:00-01:00", "HH:MM"),
            ("Mon-Fri 12:00-12:00", "starts where it ends"),
            ("Mon-Fry 12:00-13:00", "not a day"),
            ("weekdays", "not a day"),
        ] {
            let err = parse_entry(bad).expect_err(bad);
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn time_zones_are_iana_names_only() {
        assert!(time_zone("Europe/Berlin").is_ok());
        assert!(time_zone("UTC").is_ok());
        assert!(time_zone("America/New_York").is_ok());
        for bad in [
            "",
            "Mars/Olympus",
            "CEST+2",
            "+02:00",
            " Europe/Berlin",
            "Etc/Unknown",
        ] {
            let e = time_zone(bad).expect_err(bad);
            assert!(e.contains("IANA"), "{bad}: {e}");
        }
        let e = Schedule::new(&["Mon".into()], "Europe/Berlln").expect_err("zone");
        assert!(matches!(e, ScheduleError::TimeZone(_)), "{e:?}");
        assert_eq!(
            Schedule::new(&[], "UTC").expect_err("empty"),
            ScheduleError::Empty
        );
    }

    #[test]
    fn a_weekday_lunch_window_in_berlin() {
        let s = schedule(&["Mon-Fri 12:00-13:00"], "Europe/Berlin");
        // Monday 2 June 2025, CEST (UTC+2).
        assert!(!s.holds(at("2025-06-02T09:59:59Z")));
        assert!(s.holds(at("2025-06-02T10:00:00Z")));
        assert!(s.holds(at("2025-06-02T10:59:59Z")));
        assert!(!s.holds(at("2025-06-02T11:00:00Z")));
        // Saturday at the same hour.
        assert!(!s.holds(at("2025-06-07T10:30:00Z")));
        // Monday 13 January 2025, CET (UTC+1): noon is 11:00 UTC.
        assert!(!s.holds(at("2025-01-13T10:30:00Z")));
        assert!(s.holds(at("2025-01-13T11:30:00Z")));
    }

    #[test]
    fn entries_are_ored() {
        let s = schedule(&["Mon-Fri 12:00-13:00", "Sat-Sun"], "UTC");
        assert!(s.holds(at("2025-06-02T12:30:00Z"))); // Monday lunch
        assert!(!s.holds(at("2025-06-02T14:00:00Z"))); // Monday afternoon
        assert!(s.holds(at("2025-06-07T00:00:00Z"))); // Saturday, first minute
        assert!(s.holds(at("2025-06-08T23:59:59Z"))); // Sunday, last second
        assert!(!s.holds(at("2025-06-09T00:00:00Z"))); // Monday midnight
    }

    #[test]
    fn a_window_across_midnight_belongs_to_the_day_it_starts() {
        let s = schedule(&["Fri 22:00-02:00"], "UTC");
        // Friday 6 June 2025.
        assert!(!s.holds(at("2025-06-06T21:59:00Z")));
        assert!(s.holds(at("2025-06-06T22:00:00Z")));
        assert!(s.holds(at("2025-06-06T23:59:59Z")));
        // Saturday after midnight: still Friday's window.
        assert!(s.holds(at("2025-06-07T00:00:00Z")));
        assert!(s.holds(at("2025-06-07T01:59:59Z")));
        assert!(!s.holds(at("2025-06-07T02:00:00Z")));
        // Friday's own small hours belong to Thursday's window: none.
        assert!(!s.holds(at("2025-06-06T01:00:00Z")));
        // Saturday night is not Friday.
        assert!(!s.holds(at("2025-06-07T23:00:00Z")));

        // Sunday night into Monday, with the week's wrap.
        let s = schedule(&["Sun 23:00-01:00"], "UTC");
        assert!(s.holds(at("2025-06-08T23:30:00Z")));
        assert!(s.holds(at("2025-06-09T00:30:00Z")));
        // Sunday's small hours follow Saturday: no window.
        assert!(!s.holds(at("2025-06-08T00:30:00Z")));
        assert!(!s.holds(at("2025-06-09T01:00:00Z")));

        // Every night.
        let s = schedule(&["22:00-06:00"], "UTC");
        assert!(s.holds(at("2025-06-04T03:00:00Z")));
        assert!(!s.holds(at("2025-06-04T12:00:00Z")));
    }

    #[test]
    fn wall_clock_windows_across_daylight_saving_changes_in_berlin() {
        let s = schedule(&["Sun 08:00-09:00"], "Europe/Berlin");
        // Sunday 23 March 2025, CET (UTC+1): 08:00-09:00 is 07:00-08:00 UTC.
        assert!(!s.holds(at("2025-03-23T06:30:00Z")));
        assert!(s.holds(at("2025-03-23T07:30:00Z")));
        // Sunday 30 March 2025: clocks jump from 02:00 to 03:00 (CEST, UTC+2)
        // so the same wall-clock window is an hour earlier in UTC.
        assert!(s.holds(at("2025-03-30T06:30:00Z")));
        assert!(!s.holds(at("2025-03-30T07:30:00Z")));
        // Sunday 26 October 2025: back to CET at 03:00.
        assert!(!s.holds(at("2025-10-26T06:30:00Z")));
        assert!(s.holds(at("2025-10-26T07:30:00Z")));

        // A night window across the spring change: 22:00 Saturday CET to
        // 06:00 Sunday CEST is seven hours, not eight.
        let s = schedule(&["Sat 22:00-06:00"], "Europe/Berlin");
        assert!(!s.holds(at("2025-03-29T20:59:00Z")));
        assert!(s.holds(at("2025-03-29T21:00:00Z"))); // 22:00 CET
        assert!(s.holds(at("2025-03-30T00:59:00Z"))); // 01:59 CET
        assert!(s.holds(at("2025-03-30T01:00:00Z"))); // 03:00 CEST
        assert!(s.holds(at("2025-03-30T03:59:00Z"))); // 05:59 CEST
        assert!(!s.holds(at("2025-03-30T04:00:00Z"))); // 06:00 CEST

        // The hour the spring change skips never occurs; the hour the fall
        // change repeats holds twice.
        let s = schedule(&["Sun 02:00-03:00"], "Europe/Berlin");
        assert!(!s.holds(at("2025-03-30T00:59:59Z"))); // 01:59:59 CET
        assert!(!s.holds(at("2025-03-30T01:00:00Z"))); // 03:00 CEST
        assert!(s.holds(at("2025-10-26T00:30:00Z"))); // 02:30 CEST
        assert!(s.holds(at("2025-10-26T01:30:00Z"))); // 02:30 CET
        assert!(!s.holds(at("2025-10-26T02:00:00Z"))); // 03:00 CET
    }

    #[test]
    fn the_same_moment_differs_by_zone() {
        let berlin = schedule(&["Mon 09:00-10:00"], "Europe/Berlin");
        let new_york = schedule(&["Mon 09:00-10:00"], "America/New_York");
        let t = at("2025-06-02T07:30:00Z"); // 09:30 in Berlin, 03:30 in New York
        assert!(berlin.holds(t));
        assert!(!new_york.holds(t));
        assert!(new_york.holds(at("2025-06-02T13:30:00Z")));
        assert_eq!(berlin.timezone(), "Europe/Berlin");
    }
}
