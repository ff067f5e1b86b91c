//! The directory tree: inodes, each directory's entries as processes see them and as they would
//! be found after a power loss, and the fsyncs held unanswered.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::{Component, Path};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant, SystemTime};

use fuser::{Errno, FileAttr, FileType, INodeNo, RenameFlags, ReplyEmpty};
use rand::rngs::StdRng;

use super::content::{Content, PAGE};
use super::Lost;

pub(super) const ROOT: u64 = INodeNo::ROOT.0;

/// The whole tree: inodes by number.
pub(super) struct State {
    pub(super) inodes: HashMap<u64, Inode>,
    next_ino: u64,
    /// Fsync requests held unanswered ([`LossyFs::hold_syncs`](super::LossyFs::hold_syncs)):
    /// each one's inode and reply. `None`: fsyncs are answered at once.
    pub(super) held: Option<Vec<(u64, ReplyEmpty)>>,
    /// Files and directories on a full disk ([`LossyFs::fill`](super::LossyFs::fill)): writes
    /// to them and new names in them fail with `ENOSPC`.
    pub(super) full: HashSet<u64>,
    /// How many requests `full` refused.
    pub(super) refused: usize,
    /// Files and directories on a slow disk ([`LossyFs::slow_down`](super::LossyFs::slow_down)):
    /// their fsyncs are answered `slow_by` late. What is created in a slow directory is slow too.
    pub(super) slow: HashSet<u64>,
    /// How late a slow disk answers an fsync.
    pub(super) slow_by: Duration,
    /// Where fsyncs of a slow disk wait out their delay (see `fuse::answer_late`).
    pub(super) late: Sender<LateSync>,
}

/// An fsync of a slow disk: carried out and answered once it is due.
pub(super) struct LateSync {
    pub(super) due: Instant,
    pub(super) ino: u64,
    pub(super) reply: ReplyEmpty,
}

pub(super) struct Inode {
    pub(super) body: Body,
    pub(super) perm: u16,
    /// Directory entries naming this inode, as processes see them.
    pub(super) nlink: u32,
    /// Durable directory entries naming this inode: a file unlinked without a directory fsync
    /// lives on, to come back at a power loss.
    durable_links: u32,
    /// Open file handles; an unlinked file lives on until the last is released.
    pub(super) open: u32,
    mtime: SystemTime,
}

pub(super) enum Body {
    Dir(Dir),
    File(Content),
}

/// Which of an inode's two link counts a directory's entries feed.
#[derive(Clone, Copy)]
enum Links {
    /// The entries processes see: `nlink`.
    Current,
    /// The entries at the directory's last fsync: `durable_links`.
    Durable,
}

impl Links {
    fn of(self, node: &mut Inode) -> &mut u32 {
        match self {
            Links::Current => &mut node.nlink,
            Links::Durable => &mut node.durable_links,
        }
    }
}

/// A directory's entries as processes see them, and as they would be found after a power loss.
#[derive(Default)]
pub(super) struct Dir {
    entries: BTreeMap<OsString, u64>,
    /// The entries at the directory's last fsync.
    durable: BTreeMap<OsString, u64>,
}

impl Dir {
    /// How many names differ between the current and the durable entries.
    fn changed_names(&self) -> usize {
        let current = self
            .entries
            .iter()
            .filter(|(name, ino)| self.durable.get(*name) != Some(*ino))
            .count();
        let gone = self
            .durable
            .keys()
            .filter(|name| !self.entries.contains_key(*name))
            .count();
        current + gone
    }
}

/// A file's bytes as processes see them, and as they would be found after a power loss.
impl State {
    pub(super) fn new(late: Sender<LateSync>) -> State {
        let mut inodes = HashMap::new();
        inodes.insert(ROOT, Inode::new(Body::Dir(Dir::default()), 0o755));
        State {
            inodes,
            next_ino: ROOT + 1,
            held: None,
            full: HashSet::new(),
            refused: 0,
            slow: HashSet::new(),
            slow_by: Duration::ZERO,
            late,
        }
    }

    pub(super) fn get(&self, ino: u64) -> Result<&Inode, Errno> {
        self.inodes.get(&ino).ok_or(Errno::ENOENT)
    }

    pub(super) fn get_mut(&mut self, ino: u64) -> Result<&mut Inode, Errno> {
        self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    /// The current entries of directory `ino`.
    pub(super) fn dir(&self, ino: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.get(ino)?.body {
            Body::Dir(dir) => Ok(&dir.entries),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    pub(super) fn dir_mut(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.get_mut(ino)?.body {
            Body::Dir(dir) => Ok(&mut dir.entries),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    pub(super) fn file_mut(&mut self, ino: u64) -> Result<&mut Content, Errno> {
        match &mut self.get_mut(ino)?.body {
            Body::File(content) => Ok(content),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    pub(super) fn child(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.dir(parent).ok()?.get(name).copied()
    }

    /// The inode at `path` (plain and relative) below directory `from`.
    pub(super) fn resolve(&self, from: u64, path: &Path) -> anyhow::Result<u64> {
        let mut ino = from;
        for part in path.components() {
            let Component::Normal(name) = part else {
                anyhow::bail!("{path:?} must be a plain relative path");
            };
            ino = self
                .child(ino, name)
                .ok_or_else(|| anyhow::anyhow!("no {path:?} in the lossy file system"))?;
        }
        Ok(ino)
    }

    /// Makes the file `name` of `parent`, content and entry, durable as it is now.
    pub(super) fn make_durable(&mut self, parent: u64, name: &OsStr) -> anyhow::Result<()> {
        let ino = self
            .child(parent, name)
            .ok_or_else(|| anyhow::anyhow!("no file {name:?} to spare"))?;
        self.file_mut(ino)
            .map_err(|e| anyhow::anyhow!("spare {name:?}: {e:?}"))?
            .sync();
        let Some(Inode {
            body: Body::Dir(dir),
            ..
        }) = self.inodes.get_mut(&parent)
        else {
            anyhow::bail!("spare {name:?}: its parent is not a directory");
        };
        let before = dir.durable.insert(name.to_owned(), ino);
        self.relink(Links::Durable, before, Some(ino));
        Ok(())
    }

    pub(super) fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let node = self.get(ino)?;
        let (kind, size) = match &node.body {
            Body::Dir(_) => (FileType::Directory, PAGE as u64),
            Body::File(c) => (FileType::RegularFile, c.current.len() as u64),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind,
            perm: node.perm,
            nlink: node.nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    /// `ENOSPC` if `ino` is on a full disk (see [`State::full`]), counted.
    pub(super) fn space_for(&mut self, ino: u64) -> Result<(), Errno> {
        if self.full.contains(&ino) {
            self.refused += 1;
            return Err(Errno::ENOSPC);
        }
        Ok(())
    }

    /// Directory `ino` and everything its current entries name, recursively.
    pub(super) fn below(&self, ino: u64) -> Vec<u64> {
        let mut found = Vec::new();
        let mut stack = vec![ino];
        while let Some(ino) = stack.pop() {
            found.push(ino);
            if let Ok(entries) = self.dir(ino) {
                stack.extend(entries.values().copied());
            }
        }
        found
    }

    /// Adds a new inode named `name` in `parent`.
    pub(super) fn insert(
        &mut self,
        parent: u64,
        name: &OsStr,
        body: Body,
        perm: u16,
    ) -> Result<u64, Errno> {
        if self.dir(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        self.space_for(parent)?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, Inode::new(body, perm));
        if self.slow.contains(&parent) {
            self.slow.insert(ino);
        }
        self.dir_mut(parent)?.insert(name.to_owned(), ino);
        self.touch(parent);
        Ok(ino)
    }

    /// Removes the entry `name` of `parent`; the inode goes once nothing names or holds it.
    fn remove_entry(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let ino = self.dir_mut(parent)?.remove(name).ok_or(Errno::ENOENT)?;
        self.touch(parent);
        let node = self.get_mut(ino)?;
        node.nlink = node.nlink.saturating_sub(1);
        self.free_if_unused(ino);
        Ok(())
    }

    /// `unlink` (`dir` false) or `rmdir` (`dir` true, and only when empty).
    pub(super) fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = self.child(parent, name).ok_or(Errno::ENOENT)?;
        match (&self.get(ino)?.body, dir) {
            (Body::Dir(_), false) => return Err(Errno::EISDIR),
            (Body::File(_), true) => return Err(Errno::ENOTDIR),
            (Body::Dir(d), true) if !d.entries.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        self.remove_entry(parent, name)
    }

    /// Frees `ino` once nothing names it (now or durably) or holds it open; a directory freed
    /// lets go of what its entries named.
    pub(super) fn free_if_unused(&mut self, ino: u64) {
        let unused = self
            .inodes
            .get(&ino)
            .is_some_and(|n| n.nlink == 0 && n.durable_links == 0 && n.open == 0);
        if !unused || ino == ROOT {
            return;
        }
        if let Some(Inode {
            body: Body::Dir(dir),
            ..
        }) = self.inodes.remove(&ino)
        {
            self.relink(Links::Current, dir.entries.into_values(), None);
            self.relink(Links::Durable, dir.durable.into_values(), None);
        }
    }

    /// A directory's entries (current or durable, as `links` says) went from naming `old` to
    /// naming `new`: counts the new links first, so that an inode in both stays, then drops the
    /// old ones and frees what nothing holds any more.
    fn relink(
        &mut self,
        links: Links,
        old: impl IntoIterator<Item = u64>,
        new: impl IntoIterator<Item = u64>,
    ) {
        for child in new {
            if let Some(node) = self.inodes.get_mut(&child) {
                *links.of(node) += 1;
            }
        }
        for child in old {
            if let Some(node) = self.inodes.get_mut(&child) {
                let count = links.of(node);
                *count = count.saturating_sub(1);
            }
            self.free_if_unused(child);
        }
    }

    /// `fsync` of directory `ino`: its current entries become durable.
    /// `fsync` of a file or `fsyncdir` of a directory: what it holds becomes durable.
    pub(super) fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        match &mut self.get_mut(ino)?.body {
            Body::File(content) => {
                content.sync();
                Ok(())
            }
            Body::Dir(_) => self.sync_dir(ino),
        }
    }

    /// Answers an fsync request, holds it ([`LossyFs::hold_syncs`](super::LossyFs::hold_syncs)),
    /// or on a slow disk has it answered late.
    pub(super) fn sync_request(&mut self, ino: u64, reply: ReplyEmpty) {
        if let Err(e) = self.get(ino) {
            return reply.error(e);
        }
        if let Some(held) = &mut self.held {
            return held.push((ino, reply));
        }
        if self.slow.contains(&ino) {
            let due = Instant::now() + self.slow_by;
            if let Err(unsent) = self.late.send(LateSync { due, ino, reply }) {
                // Only while the file system is being dropped.
                unsent.0.reply.error(Errno::EIO);
            }
            return;
        }
        match self.sync(ino) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn sync_dir(&mut self, ino: u64) -> Result<(), Errno> {
        let Body::Dir(dir) = &mut self.get_mut(ino)?.body else {
            return Err(Errno::ENOTDIR);
        };
        let old = std::mem::replace(&mut dir.durable, dir.entries.clone());
        let new: Vec<u64> = dir.durable.values().copied().collect();
        self.relink(Links::Durable, old.into_values(), new);
        Ok(())
    }

    /// Power loss of directory `ino` (nothing if it is a file): back to its durable entries.
    /// Returns how many names changed.
    fn revert_dir(&mut self, ino: u64) -> usize {
        let Some(Inode {
            body: Body::Dir(dir),
            ..
        }) = self.inodes.get_mut(&ino)
        else {
            return 0;
        };
        let changed = dir.changed_names();
        if changed == 0 {
            return 0;
        }
        let old = std::mem::replace(&mut dir.entries, dir.durable.clone());
        let new: Vec<u64> = dir.entries.values().copied().collect();
        self.relink(Links::Current, old.into_values(), new);
        self.touch(ino);
        changed
    }

    pub(super) fn touch(&mut self, ino: u64) {
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.mtime = SystemTime::now();
        }
    }

    /// Reverts directory `ino` and everything it durably names, top down: each directory's
    /// entries first, so that only what survives them is visited. With `tear`, files keep a
    /// random part of their unsynced writes.
    pub(super) fn revert_below(&mut self, ino: u64, mut tear: Option<&mut StdRng>) -> Lost {
        let mut lost = Lost::default();
        let mut stack = vec![ino];
        while let Some(ino) = stack.pop() {
            lost.entries += self.revert_dir(ino);
            match self.inodes.get_mut(&ino).map(|n| &mut n.body) {
                Some(Body::Dir(dir)) => stack.extend(dir.entries.values().copied()),
                Some(Body::File(content)) => lost += content.revert(tear.as_deref_mut()),
                None => {}
            }
        }
        lost
    }

    pub(super) fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let ino = self.child(parent, name).ok_or(Errno::ENOENT)?;
        self.dir(new_parent)?;
        if let Some(target) = self.child(new_parent, new_name) {
            if target == ino {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            match (&self.get(ino)?.body, &self.get(target)?.body) {
                (Body::Dir(_), Body::Dir(t)) if !t.entries.is_empty() => {
                    return Err(Errno::ENOTEMPTY)
                }
                (Body::Dir(_), Body::File(_)) => return Err(Errno::ENOTDIR),
                (Body::File(_), Body::Dir(_)) => return Err(Errno::EISDIR),
                _ => {}
            }
            self.remove_entry(new_parent, new_name)?;
        } else if !flags.is_empty() && !flags.contains(RenameFlags::RENAME_NOREPLACE) {
            return Err(Errno::EINVAL);
        }
        self.dir_mut(parent)?.remove(name);
        self.dir_mut(new_parent)?.insert(new_name.to_owned(), ino);
        self.touch(parent);
        self.touch(new_parent);
        Ok(())
    }
}

impl Inode {
    pub(super) fn new(body: Body, perm: u16) -> Inode {
        Inode {
            body,
            perm,
            nlink: 1,
            durable_links: 0,
            open: 0,
            mtime: SystemTime::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(state: &mut State, parent: u64, name: &str, data: &[u8]) -> u64 {
        let mut content = Content::default();
        content.write(0, data);
        content.sync();
        state
            .insert(parent, OsStr::new(name), Body::File(content), 0o644)
            .unwrap()
    }

    fn names(state: &State, dir: u64) -> Vec<(String, u64)> {
        let entries = state.dir(dir).unwrap();
        entries
            .iter()
            .map(|(n, i)| (n.to_string_lossy().into_owned(), *i))
            .collect()
    }

    #[test]
    fn a_rename_over_a_file_is_undone_unless_the_directory_was_fsynced() {
        let mut state = State::new(std::sync::mpsc::channel().0);
        let old = file(&mut state, ROOT, "CURRENT", b"old");
        state.sync_dir(ROOT).unwrap();
        let new = file(&mut state, ROOT, "CURRENT.tmp", b"new");
        let (a, b) = (OsStr::new("CURRENT.tmp"), OsStr::new("CURRENT"));
        state
            .rename(ROOT, a, ROOT, b, RenameFlags::empty())
            .unwrap();
        assert!(state.inodes.contains_key(&old), "durably named: kept");

        let lost = state.revert_below(ROOT, None);
        assert_eq!(
            lost,
            Lost {
                files: 0,
                entries: 1,
                kept_sectors: 0,
                held_syncs: 0
            }
        );
        assert_eq!(names(&state, ROOT), [("CURRENT".to_string(), old)]);
        assert!(!state.inodes.contains_key(&new), "named nowhere: freed");

        state
            .insert(ROOT, a, Body::File(Content::default()), 0o644)
            .unwrap();
        state
            .rename(ROOT, a, ROOT, b, RenameFlags::empty())
            .unwrap();
        state.sync_dir(ROOT).unwrap();
        assert!(!state.inodes.contains_key(&old), "replaced durably: freed");
        assert_eq!(state.revert_below(ROOT, None), Lost::default());
    }

    #[test]
    fn a_directory_lost_at_a_power_loss_lets_go_of_its_files() {
        let mut state = State::new(std::sync::mpsc::channel().0);
        let dir = state
            .insert(ROOT, OsStr::new("d"), Body::Dir(Dir::default()), 0o755)
            .unwrap();
        let inside = file(&mut state, dir, "f", b"x");
        state.sync_dir(dir).unwrap();
        assert_eq!(state.revert_below(ROOT, None).entries, 1);
        assert!(!state.inodes.contains_key(&dir));
        assert!(!state.inodes.contains_key(&inside));
        assert_eq!(state.inodes.len(), 1, "only the root is left");
    }
}
