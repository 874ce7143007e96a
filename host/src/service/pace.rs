//! `Pace`: how many messages a consumer reads as one page and over how many lanes it decides
//! them, from how long its handlers have been taking.
//!
//! A page is cut to about [`PAGE_BUDGET`] of deciding. Its outcomes are committed only once the
//! whole page is decided, so a page of 64 password hashes (~23 ms each) kept the first command's
//! outcome back for 1.5 s, and a page dropped unfinished (a graceful stop, a lost lease) or sent
//! one by one after a conflict threw that much work away. A fast handler's page stays the
//! store's whole batch. (Measured, it moved neither the ratio of two instances to one nor a
//! graceful handover, which drops the page being decided rather than finishing it.)
//!
//! A page gets a lane per [`MESSAGES_PER_LANE`] messages, or per [`LANE_WORK`] of deciding when
//! that gives more: a thread hand-off and a lane's own reads cost more than a few fast handlers
//! (pages of ~6 of the counter's took ~0.35 ms on one lane, 0.47-1.0 ms on two), while two slow
//! ones are already worth two threads. Lanes by measured time alone gave the counter's pages of
//! 8-15 two lanes and cost a quarter of its throughput: a lane's own overhead counts as handler
//! time, which asked for more lanes.

use std::time::Duration;

/// About how long deciding one page may take.
pub(super) const PAGE_BUDGET: Duration = Duration::from_millis(250);
/// The fewest messages worth a decide lane (a thread) of their own.
pub(super) const MESSAGES_PER_LANE: usize = 8;
/// Deciding that is worth a lane of its own however few messages it takes.
pub(super) const LANE_WORK: Duration = Duration::from_millis(5);

#[derive(Debug, Clone)]
pub(super) struct Pace {
    /// Deciding time per message (wall time × lanes used), smoothed over pages; zero until a
    /// page is decided, taken as a fast handler.
    per_message: Duration,
    /// The store's batch: the most a page holds.
    most_per_page: usize,
    /// The most lanes: the configured decide lanes, or 1 once this service's lanes met.
    lanes: usize,
}

impl Pace {
    pub(super) fn new(most_per_page: usize, lanes: usize) -> Self {
        Self {
            per_message: Duration::ZERO,
            most_per_page: most_per_page.max(1),
            lanes: lanes.max(1),
        }
    }

    /// How many messages the next page reads.
    pub(super) fn page_limit(&self) -> usize {
        let fits = PAGE_BUDGET.as_nanos() * self.lanes as u128 / self.per_message.as_nanos().max(1);
        usize::try_from(fits)
            .unwrap_or(usize::MAX)
            .clamp(1, self.most_per_page)
    }

    /// How many lanes a page of `messages` is decided on.
    pub(super) fn lanes_for(&self, messages: usize) -> usize {
        let work = self.per_message.as_nanos() * messages as u128;
        let by_work = usize::try_from(work / LANE_WORK.as_nanos()).unwrap_or(usize::MAX);
        (messages / MESSAGES_PER_LANE)
            .max(by_work)
            .clamp(1, self.lanes)
    }

    /// Records that `messages` were decided on `lanes` lanes in `took`.
    pub(super) fn decided(&mut self, messages: usize, lanes: usize, took: Duration) {
        if messages == 0 {
            return;
        }
        let measured = took * lanes.max(1) as u32 / messages as u32;
        self.per_message = match self.per_message {
            Duration::ZERO => measured,
            before => (before + measured) / 2,
        };
    }

    /// This service's handlers read or wrote across entities: its pages go on one thread.
    pub(super) fn one_lane(&mut self) {
        self.lanes = 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fast_handler_reads_whole_batches_with_a_lane_per_eight_messages() {
        let mut pace = Pace::new(64, 2);
        assert_eq!((pace.page_limit(), pace.lanes_for(64)), (64, 2));
        // ~90 µs a message, a lane's overhead included.
        pace.decided(16, 2, Duration::from_micros(16 * 90 / 2));
        assert_eq!((pace.page_limit(), pace.lanes_for(64)), (64, 2));
        assert_eq!(pace.lanes_for(16), 2);
        assert_eq!(pace.lanes_for(15), 1, "too little for a second thread");
    }

    #[test]
    fn a_slow_handler_reads_pages_of_about_the_budget_on_every_lane() {
        let mut pace = Pace::new(64, 2);
        // Password hashes: 23 ms each, a page of 64 on two lanes in 0.74 s.
        pace.decided(64, 2, Duration::from_millis(64 * 23 / 2));
        let limit = pace.page_limit();
        assert!(
            (20..=22).contains(&limit),
            "about 0.25 s on two lanes: {limit}"
        );
        assert_eq!(
            pace.lanes_for(2),
            2,
            "two slow messages are worth two threads"
        );
        pace.one_lane();
        assert!(
            (10..=11).contains(&pace.page_limit()),
            "one thread: half the page"
        );
        assert_eq!(pace.lanes_for(64), 1);
    }

    #[test]
    fn a_handler_slower_than_the_budget_reads_one_message_at_a_time() {
        let mut pace = Pace::new(64, 1);
        pace.decided(4, 1, Duration::from_secs(4));
        assert_eq!(pace.page_limit(), 1);
    }
}
