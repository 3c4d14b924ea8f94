//! Writing files atomically, and files holding secrets private from the start.

use std::io::Write;
use std::path::Path;

/// Write `contents` to `path` readable by the owner only (mode 0600 on Unix): a temporary file
/// in the same folder, created with that mode (never wider, not even for a moment), written,
/// synced, then renamed over `path`. Readers see the old file or the new one, never a part.
pub fn write_private_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_atomic(path, contents, 0o600)
}

/// Write `contents` to `path` atomically (see [`write_private_atomic`]), the new file created
/// with `mode` (less the umask) on Unix.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a file path", path.display()),
        )
    })?;
    let tmp = dir.join(format!(
        ".{}.{}.{:016x}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        rand::random::<u64>()
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let written = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename itself is durable once the folder is synced.
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn private_files_are_0600_and_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret.key");
        // An existing file, world-readable, with a reader holding it open.
        std::fs::write(&p, b"old contents").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let reader = std::fs::File::open(&p).unwrap();
        write_private_atomic(&p, b"new contents").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new contents");
        #[cfg(unix)]
        assert_eq!(mode(&p), 0o600);
        // Replaced, not rewritten in place: the open reader still sees the whole old file.
        assert_eq!(std::io::read_to_string(reader).unwrap(), "old contents");
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret.key")]);
        // A new file is private from the start too.
        let q = dir.path().join("new.key");
        write_private_atomic(&q, b"x").unwrap();
        #[cfg(unix)]
        assert_eq!(mode(&q), 0o600);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing-folder").join("f");
        assert!(write_private_atomic(&p, b"x").is_err());
        assert!(write_private_atomic(dir.path(), b"x").is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
