//! The ledger writer's contiguous watermark: the highest stream sequence at and below which every
//! message has been committed (as a row, a dead letter or a duplicate of a row). Stream-ordered
//! readers read up to it and never past a sequence that could still arrive (a redelivery after a
//! writer crash lands after newer messages in `pos` order, never below the watermark).
//!
//! The writer notes every sequence it commits; the watermark advances while the next sequence has
//! been noted. JetStream's ack floor for the durable consumer is the same fact as the server sees
//! it (every acked message was committed first), so the writer also raises the watermark to it
//! at start and periodically: that covers messages other writers committed and sequences the
//! stream no longer holds.

use std::collections::BTreeSet;

/// Most committed sequences remembered above the watermark. They pile up only while a message
/// below them waits for its redelivery (at most the consumer's pending window); past this bound
/// they are forgotten and the ack floor moves the watermark on.
pub const MAX_ABOVE: usize = 1_000_000;

/// See the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Watermark {
    contiguous: u64,
    above: BTreeSet<u64>,
}

impl Watermark {
    /// A watermark at `contiguous`.
    pub fn at(contiguous: u64) -> Self {
        Watermark {
            contiguous,
            above: BTreeSet::new(),
        }
    }

    /// The watermark.
    pub fn get(&self) -> u64 {
        self.contiguous
    }

    /// Note that `seq` is committed.
    pub fn note(&mut self, seq: u64) {
        if seq > self.contiguous {
            if self.above.len() >= MAX_ABOVE {
                self.above.clear();
            }
            self.above.insert(seq);
        }
        self.advance();
    }

    /// Raise the watermark to `floor` (JetStream's ack floor) if it is higher.
    pub fn raise_to(&mut self, floor: u64) {
        if floor > self.contiguous {
            self.contiguous = floor;
            self.above = self.above.split_off(&(floor + 1));
        }
        self.advance();
    }

    fn advance(&mut self) {
        while self.above.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances_over_contiguous_commits_only() {
        let mut w = Watermark::at(10);
        w.note(12);
        w.note(13);
        assert_eq!(w.get(), 10, "11 is still missing");
        w.note(11);
        assert_eq!(w.get(), 13);
        w.note(5); // a redelivery of something long committed
        assert_eq!(w.get(), 13);
        w.note(20);
        w.raise_to(18);
        assert_eq!(w.get(), 18, "the ack floor moves it past gaps");
        w.note(19);
        assert_eq!(w.get(), 20);
    }
}
