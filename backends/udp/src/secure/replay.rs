//! A sliding replay window over 64-bit nonces (as WireGuard and IPsec keep one, RFC 6479 style).

/// Nonces remembered below the highest one accepted.
pub const WINDOW: u64 = 2048;
const WORDS: usize = (WINDOW / 64) as usize;

/// Which nonces of one session were already accepted. A nonce is fresh if it is above every nonce
/// seen so far, or within [`WINDOW`] below the highest and not seen yet; anything older is
/// refused (a datagram delayed that long is treated as lost). 256 bytes per session.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// One more than the highest nonce accepted; 0 before the first.
    top: u64,
    /// Bit `n % WINDOW` is set when nonce `n` (within the window) was accepted.
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// A window that has seen nothing.
    pub fn new() -> Self {
        Self { top: 0, bits: [0; WORDS] }
    }

    fn bit(nonce: u64) -> (usize, u64) {
        let position = nonce % WINDOW;
        ((position / 64) as usize, 1u64 << (position % 64))
    }

    /// Whether `nonce` would be accepted (call before the costly decryption, then
    /// [`accept`](Self::accept) once the tag verified).
    pub fn is_fresh(&self, nonce: u64) -> bool {
        if nonce == u64::MAX {
            return false;
        }
        if nonce >= self.top {
            return true;
        }
        if self.top - nonce > WINDOW {
            return false;
        }
        let (word, mask) = Self::bit(nonce);
        self.bits[word] & mask == 0
    }

    /// Records `nonce` as seen. Returns `false` (and changes nothing) if it was not fresh.
    pub fn accept(&mut self, nonce: u64) -> bool {
        if !self.is_fresh(nonce) {
            return false;
        }
        if nonce >= self.top {
            // Slide: forget the nonces that fall out of the window, which share bits with the new
            // positions top..=nonce.
            let advance = nonce + 1 - self.top;
            if advance >= WINDOW {
                self.bits = [0; WORDS];
            } else {
                for skipped in self.top..=nonce {
                    let (word, mask) = Self::bit(skipped);
                    self.bits[word] &= !mask;
                }
            }
            self.top = nonce + 1;
        }
        let (word, mask) = Self::bit(nonce);
        self.bits[word] |= mask;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_nonces_are_accepted_once() {
        let mut window = ReplayWindow::new();
        for nonce in 0..5000 {
            assert!(window.accept(nonce), "{nonce}");
            assert!(!window.accept(nonce), "{nonce} replayed");
        }
        assert!(!window.accept(0) && !window.accept(4999));
    }

    #[test]
    fn reordered_nonces_within_the_window_are_accepted_once() {
        let mut window = ReplayWindow::new();
        assert!(window.accept(100));
        for nonce in (0..100).rev() {
            assert!(window.accept(nonce), "{nonce} arrives late but within the window");
        }
        for nonce in 0..=100 {
            assert!(!window.is_fresh(nonce) && !window.accept(nonce), "{nonce} replayed");
        }
        // Gaps stay fresh until the window slides past them.
        assert!(window.accept(1000) && window.accept(500) && !window.accept(500));
        assert!(window.is_fresh(999) && window.is_fresh(101));
    }

    #[test]
    fn nonces_older_than_the_window_are_refused() {
        let mut window = ReplayWindow::new();
        assert!(window.accept(10_000));
        let oldest = 10_000 - WINDOW + 1;
        assert!(window.is_fresh(oldest), "the oldest nonce the window still covers");
        assert!(!window.is_fresh(oldest - 1), "just below the window");
        assert!(!window.accept(0));
        assert!(window.accept(oldest) && !window.accept(oldest));
    }

    #[test]
    fn sliding_forgets_old_bits_without_confusing_new_nonces() {
        let mut window = ReplayWindow::new();
        // Nonces that share a bit position with earlier ones, in small and large jumps.
        for nonce in [0, WINDOW - 1, WINDOW, 2 * WINDOW + 5, 2 * WINDOW + 6, 10 * WINDOW] {
            assert!(window.accept(nonce), "{nonce} is new");
            assert!(!window.accept(nonce), "{nonce} replayed");
        }
        // After a jump beyond the window everything below it is gone, in range nonces are fresh.
        assert!(window.is_fresh(10 * WINDOW - 1) && window.is_fresh(9 * WINDOW + 1));
        assert!(!window.is_fresh(9 * WINDOW - 1));
        // Exhaustively against a set of seen nonces.
        let mut window = ReplayWindow::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut top = 0u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Mostly forward, sometimes far back.
            let nonce = (top + 8).saturating_sub(state % (WINDOW + 300));
            let expected = !seen.contains(&nonce) && (nonce + WINDOW >= top);
            assert_eq!(window.accept(nonce), expected, "nonce {nonce}, top {top}");
            if expected {
                seen.insert(nonce);
                top = top.max(nonce + 1);
            }
        }
    }

    #[test]
    fn the_largest_nonce_is_refused() {
        let mut window = ReplayWindow::new();
        assert!(!window.accept(u64::MAX));
        assert!(window.accept(u64::MAX - 1) && !window.accept(u64::MAX - 1));
    }
}
