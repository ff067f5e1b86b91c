//! The FUSE side: the kernel's requests, served from the tree.

use std::ffi::OsStr;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Errno, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use super::content::{Content, PAGE};
use super::tree::{Body, Dir, LateSync, State};

/// The kernel must ask again every time: sizes and contents change under it at a power loss.
const NO_CACHE: Duration = Duration::ZERO;

/// The FUSE side: every request takes the one lock (requests are served by one thread anyway).
pub(super) struct Shared {
    pub(super) state: Arc<Mutex<State>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("lossy fs poisoned")
    }
}

/// Carries out and answers the fsyncs of slow disks as each falls due, in the order they came
/// (they all wait equally long), until the file system is dropped. On its own thread: the FUSE
/// session's one thread keeps serving every other request meanwhile.
pub(super) fn answer_late(state: Weak<Mutex<State>>, late: Receiver<LateSync>) {
    while let Ok(LateSync { due, ino, reply }) = late.recv() {
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let Some(state) = state.upgrade() else {
            return reply.error(Errno::EIO);
        };
        let result = state.lock().expect("lossy fs poisoned").sync(ino);
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
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
            state.space_for(new_parent.0)?;
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
        let result = state.space_for(ino.0).and_then(|()| state.file_mut(ino.0));
        match result {
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
            state.space_for(ino.0)?;
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
