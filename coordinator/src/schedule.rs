//! When a workspace stops and starts by itself: a pure function of the workspace's
//! schedule, whether it is in use, and `now` ([`judge`]), and the auto-start
//! schedule's next occurrence in its time zone ([`Autostart::next_after`]). The
//! ticker in `autostop.rs` applies what these say; tests here use explicit instants.
//!
//! - A running workspace has a deadline: the end of its start build plus its TTL.
//!   Activity (open SSH sessions and port forwards, from its agents' stats) moves
//!   it to at least now + the activity bump. At the deadline it is stopped.
//! - A stopped (or failed) workspace with an auto-start schedule is started at the
//!   schedule's next occurrence after it stopped being due.

use std::time::Duration;

use jiff::civil::Time;
use jiff::tz::TimeZone;
use mesh::Timestamp;
use mesh::api::WorkspaceState;

/// What the ticker should do with one workspace now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Write this later deadline (activity).
    Bump(Timestamp),
    Stop,
    Start,
}

/// A workspace's schedule as [`judge`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub state: WorkspaceState,
    /// `None`: it runs until stopped.
    pub deadline: Option<Timestamp>,
    pub activity_bump: Duration,
    /// The auto-start schedule's next occurrence, if it has one.
    pub next_start: Option<Timestamp>,
}

/// What to do with a workspace at `now`, `active` when any of its agents reports an
/// open session.
pub fn judge(s: &Schedule, active: bool, now: Timestamp) -> Action {
    match s.state {
        WorkspaceState::Running => {
            let Some(deadline) = s.deadline else {
                return Action::Nothing;
            };
            if active {
                let bumped = now.saturating_add(s.activity_bump);
                // Written only when it moves by a tenth of the bump (at least a
                // second): a busy workspace costs a write now and then, not per tick.
                let step = (s.activity_bump / 10).max(Duration::from_secs(1));
                if bumped > deadline && bumped.since(deadline) >= step.min(s.activity_bump) {
                    return Action::Bump(bumped);
                }
                if bumped >= deadline {
                    return Action::Nothing;
                }
            }
            if deadline <= now {
                Action::Stop
            } else {
                Action::Nothing
            }
        }
        WorkspaceState::Stopped | WorkspaceState::Failed => match s.next_start {
            Some(at) if at <= now => Action::Start,
            _ => Action::Nothing,
        },
        _ => Action::Nothing,
    }
}

/// The deadline a workspace gets when its start build ends at `ended`.
pub fn deadline_after_start(ended: Timestamp, ttl: Option<Duration>) -> Option<Timestamp> {
    ttl.map(|t| ended.saturating_add(t))
}

/// An auto-start schedule: days of the week, a time of day, a time zone, written
/// `Mon-Fri 09:00 Europe/Berlin` (days: `Mon`..`Sun`, ranges and commas, or
/// `daily`; the zone an IANA name, default UTC).
#[derive(Debug, Clone, PartialEq)]
pub struct Autostart {
    /// Monday first.
    days: [bool; 7],
    at: Time,
    tz: TimeZone,
    text: String,
}

/// How an auto-start schedule is written, for its errors.
const AUTOSTART_EXAMPLE: &str =
    "write it like \"Mon-Fri 09:00 Europe/Berlin\" or \"daily 08:30 UTC\"";

/// An auto-start schedule that cannot be read; each message names the part that is
/// wrong and the whole text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AutostartError {
    /// Not `DAYS HH:MM` with an optional zone.
    #[error("bad auto-start schedule {text:?}: {AUTOSTART_EXAMPLE}")]
    Shape { text: String },
    /// A day or a day range that is not `Mon`..`Sun`.
    #[error(
        "bad days {item:?} in auto-start schedule {text:?}: days are Mon..Sun; {AUTOSTART_EXAMPLE}"
    )]
    Days { item: String, text: String },
    /// A time that is not `HH:MM` on a 24-hour clock.
    #[error(
        "bad time {time:?} in auto-start schedule {text:?}: HH:MM, 24-hour; {AUTOSTART_EXAMPLE}"
    )]
    Time { time: String, text: String },
    /// A zone that is not an IANA time zone name this machine knows.
    #[error(
        "unknown time zone {zone:?} in auto-start schedule {text:?}: an IANA name such as Europe/Berlin or America/New_York"
    )]
    Zone { zone: String, text: String },
}

/// Day names, Monday first: short and full.
const DAYS: [(&str, &str); 7] = [
    ("mon", "monday"),
    ("tue", "tuesday"),
    ("wed", "wednesday"),
    ("thu", "thursday"),
    ("fri", "friday"),
    ("sat", "saturday"),
    ("sun", "sunday"),
];

fn day_index(word: &str) -> Option<usize> {
    let w = word.to_ascii_lowercase();
    DAYS.iter()
        .position(|(short, full)| w == *short || w == *full)
}

impl Autostart {
    /// Parses `DAYS HH:MM [ZONE]`.
    ///
    /// # Errors
    /// See [`AutostartError`]: the part that is wrong, with an example.
    pub fn parse(text: &str) -> Result<Self, AutostartError> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let (days_part, time_part, zone) = match parts.as_slice() {
            [d, t] => (*d, *t, "UTC"),
            [d, t, z] => (*d, *t, *z),
            _ => {
                return Err(AutostartError::Shape {
                    text: text.to_owned(),
                });
            }
        };
        let mut days = [false; 7];
        if days_part.eq_ignore_ascii_case("daily") || days_part == "*" {
            days = [true; 7];
        } else {
            for item in days_part.split(',') {
                let (a, b) = item.split_once('-').unwrap_or((item, item));
                let (Some(a), Some(b)) = (day_index(a), day_index(b)) else {
                    return Err(AutostartError::Days {
                        item: item.to_owned(),
                        text: text.to_owned(),
                    });
                };
                let mut i = a;
                loop {
                    days[i] = true;
                    if i == b {
                        break;
                    }
                    i = (i + 1) % 7;
                }
            }
        }
        let at: Time = time_part.parse().map_err(|_| AutostartError::Time {
            time: time_part.to_owned(),
            text: text.to_owned(),
        })?;
        let tz = TimeZone::get(zone).map_err(|_| AutostartError::Zone {
            zone: zone.to_owned(),
            text: text.to_owned(),
        })?;
        Ok(Self {
            days,
            at,
            tz,
            text: text.split_whitespace().collect::<Vec<_>>().join(" "),
        })
    }

    /// The text it was written as (normalised spaces).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first occurrence strictly after `after`. On a day the clocks skip the
    /// time (spring forward), it is the first instant after the gap; on a day they
    /// repeat it (fall back), the first of the two.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let ms = i64::try_from(after.unix_millis()).ok()?;
        let now = jiff::Timestamp::from_millisecond(ms)
            .ok()?
            .to_zoned(self.tz.clone());
        let today = now.date();
        for d in 0..8 {
            let date = today.checked_add(jiff::Span::new().days(d)).ok()?;
            let idx = date.weekday().to_monday_zero_offset();
            if !self.days[usize::try_from(idx).ok()?] {
                continue;
            }
            // `compatible`: a skipped time moves forward, a repeated one is the earlier.
            let at = date.to_datetime(self.at).to_zoned(self.tz.clone()).ok()?;
            if at.timestamp() > now.timestamp() {
                let ms = u64::try_from(at.timestamp().as_millisecond()).ok()?;
                return Some(Timestamp::from_unix_millis(ms));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(rfc3339: &str) -> Timestamp {
        let t: jiff::Timestamp = rfc3339.parse().unwrap_or_else(|e| panic!("{e}"));
        Timestamp::from_unix_millis(u64::try_from(t.as_millisecond()).unwrap_or(0))
    }

    fn running(deadline: Option<&str>) -> Schedule {
        Schedule {
            state: WorkspaceState::Running,
            deadline: deadline.map(ts),
            activity_bump: Duration::from_secs(3600),
            next_start: None,
        }
    }

    #[test]
    fn a_running_workspace_stops_at_its_deadline_unless_in_use() {
        let s = running(Some("2026-03-02T10:00:00Z"));
        assert_eq!(
            judge(&s, false, ts("2026-03-02T09:59:59Z")),
            Action::Nothing
        );
        assert_eq!(judge(&s, false, ts("2026-03-02T10:00:00Z")), Action::Stop);
        // In use at the deadline: moved to now + the bump.
        assert_eq!(
            judge(&s, true, ts("2026-03-02T10:00:00Z")),
            Action::Bump(ts("2026-03-02T11:00:00Z"))
        );
        // In use long before the deadline: nothing to write.
        assert_eq!(judge(&s, true, ts("2026-03-02T08:00:00Z")), Action::Nothing);
        // A small move is not written (a tenth of the bump is the step).
        assert_eq!(judge(&s, true, ts("2026-03-02T09:05:00Z")), Action::Nothing);
        assert_eq!(
            judge(&s, true, ts("2026-03-02T09:06:00Z")),
            Action::Bump(ts("2026-03-02T10:06:00Z"))
        );
        // No TTL: never stopped.
        assert_eq!(
            judge(&running(None), false, ts("2030-01-01T00:00:00Z")),
            Action::Nothing
        );
        assert_eq!(
            deadline_after_start(ts("2026-03-02T10:00:00Z"), Some(Duration::from_secs(20))),
            Some(ts("2026-03-02T10:00:20Z"))
        );
    }

    #[test]
    fn a_stopped_workspace_starts_on_schedule_and_builds_are_left_alone() {
        let mut s = running(None);
        s.state = WorkspaceState::Stopped;
        s.next_start = Some(ts("2026-03-02T08:00:00Z"));
        assert_eq!(
            judge(&s, false, ts("2026-03-02T07:59:00Z")),
            Action::Nothing
        );
        assert_eq!(judge(&s, false, ts("2026-03-02T08:00:00Z")), Action::Start);
        s.state = WorkspaceState::Stopping;
        assert_eq!(
            judge(&s, false, ts("2026-03-02T09:00:00Z")),
            Action::Nothing
        );
    }

    #[test]
    fn weekdays_in_berlin_across_both_dst_changes() {
        let a = Autostart::parse("Mon-Fri 09:00 Europe/Berlin").unwrap_or_else(|e| panic!("{e}"));
        // Friday 2026-03-27 10:00 Berlin (CET, +1): next is Monday 2026-03-30 09:00
        // CEST (+2), after the change on Sunday the 29th.
        assert_eq!(
            a.next_after(ts("2026-03-27T09:00:00Z")),
            Some(ts("2026-03-30T07:00:00Z"))
        );
        // Before 09:00 on a weekday: the same day.
        assert_eq!(
            a.next_after(ts("2026-03-30T06:00:00Z")),
            Some(ts("2026-03-30T07:00:00Z"))
        );
        // Autumn: Friday 2026-10-23 -> Monday 2026-10-26 09:00 CET (+1).
        assert_eq!(
            a.next_after(ts("2026-10-23T12:00:00Z")),
            Some(ts("2026-10-26T08:00:00Z"))
        );
    }

    #[test]
    fn times_the_clocks_skip_or_repeat() {
        // 02:30 does not exist in Berlin on 2026-03-29: the first instant after the
        // gap, 03:30 CEST.
        let a = Autostart::parse("Sun 02:30 Europe/Berlin").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            a.next_after(ts("2026-03-28T12:00:00Z")),
            Some(ts("2026-03-29T01:30:00Z"))
        );
        // 02:30 happens twice on 2026-10-25: the first, CEST (+2).
        assert_eq!(
            a.next_after(ts("2026-10-24T12:00:00Z")),
            Some(ts("2026-10-25T00:30:00Z"))
        );
        let ny = Autostart::parse("daily 08:30 America/New_York").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            ny.next_after(ts("2026-07-01T13:00:00Z")),
            Some(ts("2026-07-02T12:30:00Z"))
        );
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        for (text, part) in [
            ("Mon-Fri", "write it like"),
            ("Mon-Fry 09:00", "bad days \"Mon-Fry\""),
            ("Mon 9am", "bad time \"9am\""),
            ("Mon 09:00 Mars/Olympus", "unknown time zone"),
        ] {
            let err = Autostart::parse(text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(part), "{text}: {err}");
        }
        let a = Autostart::parse("sat,sun  10:00").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.as_str(), "sat,sun 10:00");
        // Fri-Mon wraps over the weekend.
        let w = Autostart::parse("Fri-Mon 10:00 UTC").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            w.next_after(ts("2026-03-03T12:00:00Z")),
            Some(ts("2026-03-06T10:00:00Z"))
        );
    }
}
