//! Power loss for real processes: a FUSE file system, held in memory, that keeps what every file
//! has been written since its last `fsync` apart from what is durable, so that
//! [`LossyFs::power_loss`] can drop it. A SIGKILL alone never tests fsync: the OS page cache
//! keeps what a killed process wrote, so a store that forgot an `fdatasync` still finds its data
//! after a restart. Here it does not.
//!
//! The model is the one of Jepsen's LazyFS:
//! - a write changes the file at once (reads see it); `fsync` / `fdatasync` of the file makes its
//!   whole current content durable;
//! - a directory change (create, rename, link, unlink, mkdir, rmdir) is visible at once and
//!   durable only once the directory itself is fsynced, as POSIX promises and no more (ext4's
//!   journal often saves a store that forgets that fsync; this model never does);
//! - a power loss puts every directory below a given one back to its durable entries (a file
//!   created since comes out missing, a file deleted or renamed away comes back), then every file
//!   still named there back to its durable content (cut back, overwritten pages restored, unsynced
//!   growth gone);
//! - or, for a [`Unsynced::Torn`] power loss, back to its durable content plus a random part of
//!   what it was written since: each 512-byte sector written since the last fsync reached the
//!   disk or not, on its own, and a file whose length changed has its old or its new length. A
//!   write can survive in part, a later write without an earlier one, and a file that grew can
//!   keep its new length with zeros where its sectors never arrived: the crash states of a disk
//!   that writes back dirty data in any order (ALICE's and CrashMonkey's, at sector
//!   granularity). Directory entries are still reverted whole, since journaled metadata does not
//!   tear.
//!
//! Files are opened with direct I/O and attributes are never cached by the kernel, so after a
//! power loss the next reader sees exactly the durable content. Everything lives in the memory
//! of the harness process: meant for chaos runs of minutes, not for large data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Component, Path};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

/// Dirty data is tracked in pages of this size, so an `fsync` copies only what changed.
const PAGE: usize = 4096;

/// What a disk writes atomically: a torn power loss keeps or loses each unsynced sector of a
/// page on its own, so a write can end in the middle of a page.
const SECTOR: usize = 512;

/// The kernel must ask again every time: sizes and contents change under it at a power loss.
const NO_CACHE: Duration = Duration::ZERO;

/// A mounted lossy file system; unmounted when dropped.
pub struct LossyFs {
    state: Arc<Mutex<State>>,
    /// The FUSE session serving the mount; dropping it unmounts.
    _session: BackgroundSession,
}

impl LossyFs {
    /// Mounts an empty lossy file system at `mountpoint` (an existing, empty directory).
    pub fn mount(mountpoint: &Path) -> anyhow::Result<LossyFs> {
        let state = Arc::new(Mutex::new(State::new()));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("strata-lossy".into()),
            MountOption::NoAtime,
        ];
        let session = fuser::spawn_mount(
            Shared {
                state: state.clone(),
            },
            mountpoint,
            &config,
        )
        .map_err(|e| anyhow::anyhow!("mount the lossy file system at {mountpoint:?}: {e}"))?;
        Ok(LossyFs {
            state,
            _session: session,
        })
    }

    /// Drops every change below `dir` (a path relative to the mount point) that was not
    /// fsynced, as a power cut would: directory entries first, then file data. The files named
    /// in `spared` (paths relative to `dir`) are kept whole, as if they were on another disk: a
    /// node's log, for the report. The processes using those files must be dead already.
    /// `unsynced` says whether every unsynced write is lost or a random part of them survives.
    /// Returns what was lost.
    pub fn power_loss(
        &self,
        dir: &Path,
        spared: &[&Path],
        unsynced: Unsynced,
    ) -> anyhow::Result<Lost> {
        let mut state = self.state.lock().expect("lossy fs poisoned");
        let root = state.resolve(ROOT, dir)?;
        for path in spared {
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                anyhow::bail!("power loss: {path:?} names no file");
            };
            let parent = state.resolve(root, parent)?;
            state.make_durable(parent, name)?;
        }
        let mut tear = match unsynced {
            Unsynced::Dropped => None,
            Unsynced::Torn { seed } => Some(StdRng::seed_from_u64(seed)),
        };
        Ok(state.revert_below(root, tear.as_mut()))
    }
}

impl LossyFs {
    /// From now on `fsync` and `fsyncdir` wait unanswered (their callers blocked in the kernel)
    /// until [`fail_held_syncs`](Self::fail_held_syncs) or
    /// [`answer_held_syncs`](Self::answer_held_syncs). A power loss in between finds what an
    /// fsync was about to make durable: the window in which every store has written but not
    /// yet acknowledged. Whoever holds them must not fsync on this file system meanwhile.
    pub fn hold_syncs(&self) {
        let mut state = self.state.lock().expect("lossy fs poisoned");
        if state.held.is_none() {
            state.held = Some(Vec::new());
        }
    }

    /// Fails every held fsync with an I/O error, making nothing durable, and answers fsyncs at
    /// once again. For a power cut: call it once the processes waiting on them are SIGKILLed,
    /// so that they can die (a process cannot exit while its FUSE request is unanswered) and
    /// none sees the error. Returns how many were held.
    pub fn fail_held_syncs(&self) -> usize {
        let held = {
            let mut state = self.state.lock().expect("lossy fs poisoned");
            state.held.take().unwrap_or_default()
        };
        let count = held.len();
        for (_, reply) in held {
            reply.error(Errno::EIO);
        }
        count
    }

    /// Carries out every held fsync, and answers fsyncs at once again.
    pub fn answer_held_syncs(&self) {
        let mut state = self.state.lock().expect("lossy fs poisoned");
        for (ino, reply) in state.held.take().unwrap_or_default() {
            match state.sync(ino) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        }
    }

    /// How many fsyncs are held now.
    pub fn held_syncs(&self) -> usize {
        let state = self.state.lock().expect("lossy fs poisoned");
        state.held.as_ref().map_or(0, Vec::len)
    }
}

/// What of the unsynced writes a power loss leaves on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsynced {
    /// None: every file goes back to what it held at its last fsync. The most that a missing
    /// fsync can lose.
    Dropped,
    /// A random part, drawn from `seed`: each sector written since the file's last fsync reached
    /// the disk or not, and a file whose length changed has its old or its new one. A store
    /// must still recover from what is there: a torn tail, a hole with later data after it, or
    /// zeros in a file that grew.
    Torn {
        /// Seeds the sector-by-sector choices, so that a run can be repeated.
        seed: u64,
    },
}

/// What a power loss dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Lost {
    /// Files whose content went back to what was last fsynced.
    pub files: usize,
    /// Directory entries that went back to what was there at the directory's last fsync (a
    /// name created since and gone, deleted since and back, or naming another file).
    pub entries: usize,
    /// Sectors written since their file's last fsync that reached the disk anyway (a
    /// [`Unsynced::Torn`] power loss; 0 otherwise).
    pub kept_sectors: usize,
    /// Fsyncs that were waiting, held, when the power went ([`LossyFs::hold_syncs`]).
    pub held_syncs: usize,
}

impl std::ops::AddAssign for Lost {
    fn add_assign(&mut self, other: Lost) {
        self.files += other.files;
        self.entries += other.entries;
        self.kept_sectors += other.kept_sectors;
        self.held_syncs += other.held_syncs;
    }
}

/// Whether a lossy file system can be mounted here; `Err` says why not.
pub fn availability() -> Result<(), String> {
    // One directory per probe: tests may probe from several threads at once.
    static PROBES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("strata-lossy-probe-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {dir:?}: {e}"))?;
    let probe = (|| {
        let fs = LossyFs::mount(&dir).map_err(|e| format!("{e:#}"))?;
        std::fs::write(dir.join("probe"), b"x").map_err(|e| format!("write through FUSE: {e}"))?;
        drop(fs);
        Ok(())
    })();
    let _ = std::fs::remove_dir(&dir);
    probe
}

/// Unmounts `dir` if it is a lossy file system whose harness died (every access then fails with
/// "transport endpoint is not connected"), so that a new run can use the directory again.
pub fn detach_if_dead(dir: &Path) {
    if let Err(e) = std::fs::metadata(dir) {
        if e.raw_os_error() == Some(nix::libc::ENOTCONN) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(dir)
                .status();
        }
    }
}

const ROOT: u64 = INodeNo::ROOT.0;

/// The whole tree: inodes by number.
struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    /// Fsync requests held unanswered ([`LossyFs::hold_syncs`]): each one's inode and reply.
    /// `None`: fsyncs are answered at once.
    held: Option<Vec<(u64, ReplyEmpty)>>,
}

struct Inode {
    body: Body,
    perm: u16,
    /// Directory entries naming this inode, as processes see them.
    nlink: u32,
    /// Durable directory entries naming this inode: a file unlinked without a directory fsync
    /// lives on, to come back at a power loss.
    durable_links: u32,
    /// Open file handles; an unlinked file lives on until the last is released.
    open: u32,
    mtime: SystemTime,
}

enum Body {
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
struct Dir {
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
#[derive(Default)]
struct Content {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// Pages of `current` written or cut since the last fsync. Every byte where `current` and
    /// `durable` differ lies in one of them or beyond `durable`'s end.
    dirty: BTreeSet<usize>,
}

impl Content {
    fn mark(&mut self, from: usize, to: usize) {
        if to > from {
            self.dirty.extend(from / PAGE..=(to - 1) / PAGE);
        }
    }

    fn write(&mut self, offset: usize, data: &[u8]) {
        let end = offset + data.len();
        if end > self.current.len() {
            let old = self.current.len();
            self.current.resize(end, 0);
            self.mark(old, end);
        }
        self.current[offset..end].copy_from_slice(data);
        self.mark(offset, end);
    }

    fn set_len(&mut self, len: usize) {
        let old = self.current.len();
        self.current.resize(len, 0);
        self.mark(old.min(len), old.max(len));
    }

    /// `fsync`: the current content becomes durable.
    fn sync(&mut self) {
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
    /// written since (see [`Unsynced::Torn`]). Counts the file in [`Lost::files`] if it had
    /// anything unsynced.
    fn revert(&mut self, tear: Option<&mut StdRng>) -> Lost {
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

impl State {
    fn new() -> State {
        let mut inodes = HashMap::new();
        inodes.insert(ROOT, Inode::new(Body::Dir(Dir::default()), 0o755));
        State {
            inodes,
            next_ino: ROOT + 1,
            held: None,
        }
    }

    fn get(&self, ino: u64) -> Result<&Inode, Errno> {
        self.inodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn get_mut(&mut self, ino: u64) -> Result<&mut Inode, Errno> {
        self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    /// The current entries of directory `ino`.
    fn dir(&self, ino: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.get(ino)?.body {
            Body::Dir(dir) => Ok(&dir.entries),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.get_mut(ino)?.body {
            Body::Dir(dir) => Ok(&mut dir.entries),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut Content, Errno> {
        match &mut self.get_mut(ino)?.body {
            Body::File(content) => Ok(content),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn child(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.dir(parent).ok()?.get(name).copied()
    }

    /// The inode at `path` (plain and relative) below directory `from`.
    fn resolve(&self, from: u64, path: &Path) -> anyhow::Result<u64> {
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
    fn make_durable(&mut self, parent: u64, name: &OsStr) -> anyhow::Result<()> {
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

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
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

    /// Adds a new inode named `name` in `parent`.
    fn insert(&mut self, parent: u64, name: &OsStr, body: Body, perm: u16) -> Result<u64, Errno> {
        if self.dir(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, Inode::new(body, perm));
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
    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
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
    fn free_if_unused(&mut self, ino: u64) {
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
    fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        match &mut self.get_mut(ino)?.body {
            Body::File(content) => {
                content.sync();
                Ok(())
            }
            Body::Dir(_) => self.sync_dir(ino),
        }
    }

    /// Answers an fsync request, or holds it ([`LossyFs::hold_syncs`]).
    fn sync_request(&mut self, ino: u64, reply: ReplyEmpty) {
        if let Err(e) = self.get(ino) {
            return reply.error(e);
        }
        match &mut self.held {
            Some(held) => held.push((ino, reply)),
            None => match self.sync(ino) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
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

    fn touch(&mut self, ino: u64) {
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.mtime = SystemTime::now();
        }
    }

    /// Reverts directory `ino` and everything it durably names, top down: each directory's
    /// entries first, so that only what survives them is visited. With `tear`, files keep a
    /// random part of their unsynced writes.
    fn revert_below(&mut self, ino: u64, mut tear: Option<&mut StdRng>) -> Lost {
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

    fn rename(
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
    fn new(body: Body, perm: u16) -> Inode {
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

/// The FUSE side: every request takes the one lock (requests are served by one thread anyway).
struct Shared {
    state: Arc<Mutex<State>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("lossy fs poisoned")
    }
}

/// Every handle is opened with direct I/O: no kernel page cache that could outlive a power loss.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_DIRECT_IO;

fn perm_of(mode: u32, umask: u32) -> u16 {
    (mode & !umask & 0o7777) as u16
}

impl Filesystem for Shared {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let state = self.lock();
        match state
            .dir(parent.0)
            .and_then(|d| d.get(name).copied().ok_or(Errno::ENOENT))
            .and_then(|ino| state.attr(ino))
        {
            Ok(attr) => reply.entry(&NO_CACHE, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.lock().attr(ino.0) {
            Ok(attr) => reply.attr(&NO_CACHE, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.lock();
        let result = (|| {
            if let Some(size) = size {
                state.file_mut(ino.0)?.set_len(size as usize);
                state.touch(ino.0);
            }
            if let Some(mode) = mode {
                state.get_mut(ino.0)?.perm = perm_of(mode, 0);
            }
            state.attr(ino.0)
        })();
        match result {
            Ok(attr) => reply.attr(&NO_CACHE, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut state = self.lock();
        let body = Body::Dir(Dir::default());
        match state
            .insert(parent.0, name, body, perm_of(mode, umask))
            .and_then(|ino| state.attr(ino))
        {
            Ok(attr) => reply.entry(&NO_CACHE, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.lock().remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.lock().remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self
            .lock()
            .rename(parent.0, name, new_parent.0, new_name, flags)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        new_parent: INodeNo,
        new_name: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut state = self.lock();
        let result = (|| {
            if let Body::Dir(_) = state.get(ino.0)?.body {
                return Err(Errno::EPERM);
            }
            if state.dir(new_parent.0)?.contains_key(new_name) {
                return Err(Errno::EEXIST);
            }
            state
                .dir_mut(new_parent.0)?
                .insert(new_name.to_owned(), ino.0);
            state.get_mut(ino.0)?.nlink += 1;
            state.touch(new_parent.0);
            state.attr(ino.0)
        })();
        match result {
            Ok(attr) => reply.entry(&NO_CACHE, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut state = self.lock();
        match state.get_mut(ino.0) {
            Ok(node) => {
                node.open += 1;
                reply.opened(FileHandle(0), OPEN_FLAGS);
            }
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = self.lock();
        let result = (|| {
            let ino = match state.child(parent.0, name) {
                Some(_) if flags & nix::libc::O_EXCL != 0 => return Err(Errno::EEXIST),
                Some(ino) => {
                    if flags & nix::libc::O_TRUNC != 0 {
                        state.file_mut(ino)?.set_len(0);
                    }
                    ino
                }
                None => {
                    let body = Body::File(Content::default());
                    state.insert(parent.0, name, body, perm_of(mode, umask))?
                }
            };
            state.get_mut(ino)?.open += 1;
            state.attr(ino)
        })();
        match result {
            Ok(attr) => reply.created(&NO_CACHE, &attr, Generation(0), FileHandle(0), OPEN_FLAGS),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let mut state = self.lock();
        match state.file_mut(ino.0) {
            Ok(content) => {
                let len = content.current.len();
                let start = (offset as usize).min(len);
                let end = start.saturating_add(size as usize).min(len);
                reply.data(&content.current[start..end]);
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut state = self.lock();
        match state.file_mut(ino.0) {
            Ok(content) => {
                content.write(offset as usize, data);
                state.touch(ino.0);
                reply.written(data.len() as u32);
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.lock();
        if let Ok(node) = state.get_mut(ino.0) {
            node.open = node.open.saturating_sub(1);
        }
        state.free_if_unused(ino.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.lock().sync_request(ino.0, reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let state = self.lock();
        let entries = match state.dir(ino.0) {
            Ok(entries) => entries,
            Err(e) => return reply.error(e),
        };
        let dots = [(ino.0, OsStr::new(".")), (ino.0, OsStr::new(".."))];
        let all = dots
            .into_iter()
            .chain(entries.iter().map(|(name, ino)| (*ino, name.as_os_str())));
        for (i, (child, name)) in all.enumerate().skip(offset as usize) {
            let kind = match state.inodes.get(&child).map(|n| &n.body) {
                Some(Body::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.lock().sync_request(ino.0, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Plenty of room: 64 GiB in 4 KiB blocks, a million inodes.
        let blocks = 16 << 20;
        reply.statfs(
            blocks,
            blocks,
            blocks,
            1 << 20,
            1 << 20,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut state = self.lock();
        let result = (|| {
            let content = state.file_mut(ino.0)?;
            match mode {
                // Preallocation without growing the file (RocksDB's WAL and SST files).
                nix::libc::FALLOC_FL_KEEP_SIZE => Ok(()),
                0 => {
                    let end = (offset + length) as usize;
                    if end > content.current.len() {
                        content.set_len(end);
                    }
                    Ok(())
                }
                _ => Err(Errno::EOPNOTSUPP),
            }
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
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

#[cfg(test)]
mod dir_tests {
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
        let mut state = State::new();
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
        let mut state = State::new();
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

/// Through the kernel: a real mount, written with `std::fs`, as the nodes use it.
#[cfg(test)]
mod mount_tests {
    use std::io::Write;

    use super::*;

    /// A lossy file system mounted on a new temporary directory, or `None` (said loudly, like
    /// the suite's SKIP lines) where this machine cannot mount FUSE.
    fn mounted() -> Option<(tempfile::TempDir, LossyFs)> {
        if let Err(why) = availability() {
            eprintln!("SKIPPED: FUSE cannot be mounted here: {why}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = LossyFs::mount(dir.path()).unwrap();
        Some((dir, fs))
    }

    #[test]
    fn a_power_loss_drops_exactly_the_unsynced_writes_below_its_directory() {
        let Some((dir, fs)) = mounted() else { return };
        let db = dir.path().join("node-1/db");
        std::fs::create_dir_all(&db).unwrap();

        let sync_dir = |path: &Path| std::fs::File::open(path).unwrap().sync_all().unwrap();

        let mut wal = std::fs::File::create(db.join("wal")).unwrap();
        wal.write_all(b"synced").unwrap();
        wal.sync_data().unwrap();
        std::fs::write(db.join("never-synced"), b"gone").unwrap();
        std::fs::write(db.join("obsolete"), b"old").unwrap();
        std::fs::File::open(db.join("obsolete"))
            .unwrap()
            .sync_all()
            .unwrap();
        sync_dir(&db);
        wal.write_all(b"+unsynced").unwrap();

        // Renamed and its directory fsynced: durable.
        let staged = db.join("current.tmp");
        let mut f = std::fs::File::create(&staged).unwrap();
        f.write_all(b"renamed").unwrap();
        f.sync_all().unwrap();
        std::fs::rename(&staged, db.join("CURRENT")).unwrap();
        sync_dir(&db);
        // Deleted, its directory not fsynced since: it comes back.
        std::fs::remove_file(db.join("obsolete")).unwrap();
        // The file fsynced, its name not: it goes, with the directory made after the last
        // directory fsync.
        let mut lost = std::fs::File::create(db.join("unnamed")).unwrap();
        lost.write_all(b"data").unwrap();
        lost.sync_all().unwrap();
        std::fs::create_dir(db.join("new-dir")).unwrap();
        std::fs::write(db.join("new-dir/inside"), b"x").unwrap();
        let log = dir.path().join("node-1/node.log");
        std::fs::write(&log, b"log line").unwrap();
        drop((wal, f, lost));

        let got = fs
            .power_loss(Path::new("node-1/db"), &[], Unsynced::Dropped)
            .unwrap();
        assert_eq!(
            got,
            Lost {
                files: 2,
                entries: 3,
                kept_sectors: 0,
                held_syncs: 0
            }
        );
        let mut names: Vec<_> = std::fs::read_dir(&db)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["CURRENT", "never-synced", "obsolete", "wal"]);
        assert_eq!(std::fs::read(db.join("wal")).unwrap(), b"synced");
        assert_eq!(std::fs::read(db.join("never-synced")).unwrap(), b"");
        assert_eq!(std::fs::read(db.join("obsolete")).unwrap(), b"old", "back");
        assert_eq!(std::fs::read(db.join("CURRENT")).unwrap(), b"renamed");
        assert_eq!(
            std::fs::read(&log).unwrap(),
            b"log line",
            "outside the directory"
        );
        assert!(fs
            .power_loss(Path::new("node-1/nope"), &[], Unsynced::Dropped)
            .is_err());

        // The whole node directory: `db` was never named durably in it, so it goes; the spared
        // log stays whole.
        std::fs::write(&log, b"log line\nmore").unwrap();
        let got = fs
            .power_loss(
                Path::new("node-1"),
                &[Path::new("node.log")],
                Unsynced::Dropped,
            )
            .unwrap();
        assert_eq!(got.entries, 1, "db");
        assert!(!db.exists());
        assert_eq!(std::fs::read(&log).unwrap(), b"log line\nmore");
        drop(fs);
    }

    #[test]
    fn a_held_fsync_waits_until_it_is_failed_or_carried_out() {
        let Some((dir, fs)) = mounted() else { return };
        let path = dir.path().join("wal");
        let mut wal = std::fs::File::create(&path).unwrap();
        std::fs::File::open(dir.path()).unwrap().sync_all().unwrap();
        wal.write_all(b"synced").unwrap();
        wal.sync_data().unwrap();

        // Starts an fsync of the file on another thread; its result arrives on the channel.
        let fsync_in_background = |wal: &std::fs::File| {
            let wal = wal.try_clone().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let result = wal.sync_data().map_err(|e| e.raw_os_error());
                // Closed before the answer: the test unmounts once it has it.
                drop(wal);
                tx.send(result)
            });
            rx
        };
        let wait = Duration::from_millis(200);

        fs.hold_syncs();
        wal.write_all(b"+in flight").unwrap();
        let done = fsync_in_background(&wal);
        assert!(done.recv_timeout(wait).is_err(), "held: not answered");
        assert_eq!(fs.fail_held_syncs(), 1);
        let failed = done.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(failed, Err(Some(nix::errno::Errno::EIO as i32)));
        fs.power_loss(Path::new(""), &[], Unsynced::Dropped)
            .unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"synced",
            "nothing made durable"
        );

        drop(wal);
        fs.hold_syncs();
        let mut wal = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        wal.write_all(b"+later").unwrap();
        let done = fsync_in_background(&wal);
        assert!(done.recv_timeout(wait).is_err(), "held: not answered");
        fs.answer_held_syncs();
        assert_eq!(done.recv_timeout(Duration::from_secs(5)).unwrap(), Ok(()));
        fs.power_loss(Path::new(""), &[], Unsynced::Dropped)
            .unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"synced+later",
            "carried out"
        );
        // Closed before the unmount, which fails while a file is open.
        drop(wal);
        drop(fs);
    }
}
