//! How many tokens to draft next, from the acceptance just measured.
//!
//! The rule: start at `--num-draft-tokens` K; after a round that kept every
//! draft token, draft one more (up to 2K, at least 2); after a round that
//! kept fewer than half, one fewer (down to 1); otherwise keep the length.
//! A drafter that agrees with the verifier earns longer rounds (fewer
//! verifier forwards per token); one that does not stops wasting draft
//! forwards on tokens that are thrown away.
pub struct DraftLength {
    k: usize,
    max: usize,
    adaptive: bool,
}

impl DraftLength {
    pub fn new(start: usize, adaptive: bool) -> Self {
        let start = start.max(1);
        Self { k: start, max: (2 * start).max(2), adaptive }
    }

    /// Draft tokens for the next round.
    pub fn get(&self) -> usize {
        self.k
    }

    /// After a round that drafted `drafted` tokens and kept `kept`.
    pub fn update(&mut self, drafted: usize, kept: usize) {
        if !self.adaptive || drafted == 0 {
            return;
        }
        if kept == drafted {
            self.k = (self.k + 1).min(self.max);
        } else if kept * 2 < drafted {
            self.k = self.k.saturating_sub(1).max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_on_full_acceptance_and_shrinks_on_poor_acceptance_within_bounds() {
        let mut d = DraftLength::new(3, true);
        for _ in 0..10 {
            let k = d.get();
            d.update(k, k);
        }
        assert_eq!(d.get(), 6);
        d.update(6, 4);
        assert_eq!(d.get(), 6, "two thirds kept: unchanged");
        for _ in 0..10 {
            let k = d.get();
            d.update(k, 0);
        }
        assert_eq!(d.get(), 1);
        let mut fixed = DraftLength::new(4, false);
        fixed.update(4, 0);
        assert_eq!(fixed.get(), 4);
        assert_eq!(DraftLength::new(0, true).get(), 1);
    }
}
