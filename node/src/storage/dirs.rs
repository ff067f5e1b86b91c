//! Directories that survive a power cut. POSIX makes a new, renamed or deleted directory entry
//! durable only once the directory holding it is fsynced; fsyncing the file itself is not enough.
//! ext4's journal usually hides a missing directory fsync, which is why it is easy to forget;
//! the chaos suite's lossy file system does not (`power-loss` nemesis).

use std::fs::File;
use std::io::ErrorKind;
use std::path::Path;

/// Makes the entries of directory `dir` (creations, renames, deletions in it) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    if crate::planted::active(crate::planted::Bug::SkipDirFsync) {
        return Ok(());
    }
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents, each made durable in its parent before anything is
/// written below it. Costs nothing when `dir` exists.
pub fn create_dir_durable(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    create_dir_durable(parent)?;
    match std::fs::create_dir(dir) {
        // Made meanwhile by someone else, who may not have synced it yet.
        Err(e) if e.kind() == ErrorKind::AlreadyExists && dir.is_dir() => {}
        other => other?,
    }
    sync_dir(parent)
}

/// Deletes `path` durably; a file already gone is fine.
pub fn remove_file_durable(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(()) => sync_dir(path.parent().unwrap_or(Path::new("."))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_nested_directories_and_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/c");
        create_dir_durable(&dir).unwrap();
        assert!(dir.is_dir());
        create_dir_durable(&dir).unwrap();

        let file = dir.join("f");
        std::fs::write(&file, b"x").unwrap();
        remove_file_durable(&file).unwrap();
        assert!(!file.exists());
        remove_file_durable(&file).unwrap();
    }

    #[test]
    fn a_file_in_the_way_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(create_dir_durable(&file.join("sub")).is_err());
        assert!(create_dir_durable(&file).is_err());
    }
}
