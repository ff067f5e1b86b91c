//! One file's bytes: what processes see, what is durable, and what a power loss leaves.

use std::collections::BTreeSet;

use rand::rngs::StdRng;
use rand::Rng;

use super::Lost;

/// Dirty data is tracked in pages of this size, so an `fsync` copies only what changed.
pub(super) const PAGE: usize = 4096;

/// What a disk writes atomically: a torn power loss keeps or loses each unsynced sector of a
/// page on its own, so a write can end in the middle of a page.
pub(super) const SECTOR: usize = 512;

#[derive(Default)]
pub(super) struct Content {
    pub(super) current: Vec<u8>,
    durable: Vec<u8>,
    /// Pages of `current` written or cut since the last fsync. Every byte where `current` and
    /// `durable` differ lies in one of them or beyond `durable`'s end.
    pub(super) dirty: BTreeSet<usize>,
}

impl Content {
    fn mark(&mut self, from: usize, to: usize) {
        if to > from {
            self.dirty.extend(from / PAGE..=(to - 1) / PAGE);
        }
    }

    pub(super) fn write(&mut self, offset: usize, data: &[u8]) {
        let end = offset + data.len();
        if end > self.current.len() {
            let old = self.current.len();
            self.current.resize(end, 0);
            self.mark(old, end);
        }
        self.current[offset..end].copy_from_slice(data);
        self.mark(offset, end);
    }

    pub(super) fn set_len(&mut self, len: usize) {
        let old = self.current.len();
        self.current.resize(len, 0);
        self.mark(old.min(len), old.max(len));
    }

    /// `fsync`: the current content becomes durable.
    pub(super) fn sync(&mut self) {
        self.durable.resize(self.current.len(), 0);
        for page in std::mem::take(&mut self.dirty) {
            let start = page * PAGE;
            let end = (start + PAGE).min(self.current.len());
            if start < end {
                self.durable[start..end].copy_from_slice(&self.current[start..end]);
            }
        }
    }

    /// Power loss: back to the durable content, plus, with `tear`, a random part of what was
    /// written since (see [`Unsynced::Torn`](super::Unsynced::Torn)). Counts the file in
    /// [`Lost::files`] if it had anything unsynced.
    pub(super) fn revert(&mut self, tear: Option<&mut StdRng>) -> Lost {
        let resized = self.current.len() != self.durable.len();
        if self.dirty.is_empty() && !resized {
            return Lost::default();
        }
        let mut lost = Lost {
            files: 1,
            ..Lost::default()
        };
        let written = std::mem::replace(&mut self.current, self.durable.clone());
        if let Some(rng) = tear {
            if resized && rng.random_bool(0.5) {
                // The new length reached the disk; sectors that did not read as zeros.
                self.current.resize(written.len(), 0);
            }
            let len = written.len().min(self.current.len());
            for &page in &self.dirty {
                for start in (page * PAGE..(page + 1) * PAGE).step_by(SECTOR) {
                    let end = (start + SECTOR).min(len);
                    if start < end && rng.random_bool(0.5) {
                        self.current[start..end].copy_from_slice(&written[start..end]);
                        lost.kept_sectors += 1;
                    }
                }
            }
        }
        self.dirty.clear();
        lost
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn revert_keeps_only_what_was_synced() {
        let mut c = Content::default();
        c.write(0, b"hello");
        c.sync();
        c.write(5, b" world");
        c.write(0, b"J");
        assert_eq!(c.current, b"Jello world");
        assert_eq!(c.revert(None).files, 1);
        assert_eq!(c.current, b"hello");
        assert_eq!(c.revert(None), Lost::default(), "nothing left to lose");
    }

    #[test]
    fn overwrites_past_the_first_page_are_restored() {
        let mut c = Content::default();
        c.write(0, &vec![1u8; 3 * PAGE]);
        c.sync();
        c.write(PAGE + 10, &[9u8; PAGE]);
        c.set_len(PAGE / 2);
        c.set_len(3 * PAGE);
        c.revert(None);
        assert_eq!(c.current, vec![1u8; 3 * PAGE]);
    }

    #[test]
    fn sync_copies_cuts_and_overwrites() {
        let mut c = Content::default();
        c.write(0, &vec![1u8; 2 * PAGE]);
        c.sync();
        c.write(PAGE - 1, &[7, 7]);
        c.set_len(PAGE + 1);
        c.sync();
        c.write(0, b"lost");
        c.revert(None);
        let mut want = vec![1u8; PAGE + 1];
        want[PAGE - 1] = 7;
        want[PAGE] = 7;
        assert_eq!(c.current, want);
    }

    /// Every sector of a torn file is its durable or its written content, and over many seeds
    /// each sector and the length come out both ways.
    #[test]
    fn a_torn_power_loss_keeps_each_unsynced_sector_or_not_and_the_old_or_new_length() {
        let synced = vec![1u8; 2 * PAGE];
        let (mut some_kept, mut some_lost, mut grew, mut zeros) = (false, false, false, false);
        let mut torn_in_a_page = false;
        for seed in 0..64 {
            let mut c = Content::default();
            c.write(0, &synced);
            c.sync();
            // Overwrite the second page, then grow the file by two pages.
            c.write(PAGE, &vec![2u8; PAGE]);
            c.write(2 * PAGE, &vec![3u8; 2 * PAGE]);
            let written = c.current.clone();
            let lost = c.revert(Some(&mut StdRng::seed_from_u64(seed)));
            assert_eq!(lost.files, 1);
            let len = c.current.len();
            assert!(len == synced.len() || len == written.len(), "length {len}");
            grew |= len == written.len();
            assert_eq!(
                c.current[..PAGE],
                synced[..PAGE],
                "an unwritten page never changes"
            );
            let mut kept = 0;
            for sector in PAGE / SECTOR..len / SECTOR {
                let range = sector * SECTOR..(sector + 1) * SECTOR;
                let got = &c.current[range.clone()];
                if got == &written[range.clone()] {
                    kept += 1;
                    some_kept = true;
                } else {
                    let old = synced.get(range).unwrap_or(&[0u8; SECTOR][..]);
                    assert_eq!(got, old, "sector {sector}");
                    some_lost = true;
                    zeros |= sector >= synced.len() / SECTOR;
                }
            }
            assert_eq!(kept, lost.kept_sectors, "seed {seed}");
            let second_page = &c.current[PAGE..2 * PAGE];
            torn_in_a_page |= second_page.contains(&1) && second_page.contains(&2);
            assert!(c.dirty.is_empty());
        }
        assert!(some_kept && some_lost && grew && zeros && torn_in_a_page);
    }

    #[test]
    fn a_torn_power_loss_of_a_synced_file_changes_nothing() {
        let mut c = Content::default();
        c.write(0, b"all synced");
        c.sync();
        let lost = c.revert(Some(&mut StdRng::seed_from_u64(7)));
        assert_eq!(lost, Lost::default());
        assert_eq!(c.current, b"all synced");
    }
}
