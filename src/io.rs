//! Small file helpers shared by every reader and writer: atomic writes (temporary file in the same
//! folder, fsync, rename), so that a reader never sees half a file; reads whose errors name the file
//! and say in words what is wrong with it (a folder, a link loop, a dangling link, not UTF-8).
use crate::{Error, Result};
use std::io::{Read, Write};
use std::path::Path;

/// Write `bytes` to `path` atomically: `path` holds either its old contents or all of the new ones.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e: std::io::Error| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// What `path` is, following symbolic links: `Ok(None)` when nothing is there. A link loop, a link
/// whose target is missing, or a permission problem is an error that names `path` in words (the
/// operating system's "Too many levels of symbolic links" does not say which file).
pub fn metadata(path: &Path) -> Result<Option<std::fs::Metadata>> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::read_link(path) {
            Ok(target) => Err(Error::format(
                path,
                format!(
                    "a symbolic link to {}, which does not exist",
                    target.display()
                ),
            )),
            Err(_) => Ok(None),
        },
        Err(e) => Err(error(path, e)),
    }
}

/// Whether something is at `path` (following links); errors as for [`metadata`].
pub fn exists(path: &Path) -> Result<bool> {
    Ok(metadata(path)?.is_some())
}

/// Open `path` for reading, refusing anything but a regular file by name (a folder, a device, a
/// link loop): memory-mapping a folder would otherwise fail with "No such device".
pub fn open_file(path: &Path) -> Result<std::fs::File> {
    let m = metadata(path)?.ok_or_else(|| Error::format(path, "no such file"))?;
    if m.is_dir() {
        return Err(Error::format(path, "is a folder, expected a file"));
    }
    if !m.is_file() {
        return Err(Error::format(
            path,
            "not a regular file (a device, pipe or socket), expected a file",
        ));
    }
    std::fs::File::open(path).map_err(|e| error(path, e))
}

/// A file's bytes; errors name the file (see [`open_file`]).
pub fn read(path: &Path) -> Result<Vec<u8>> {
    let mut f = open_file(path)?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(|e| error(path, e))?;
    Ok(bytes)
}

/// A file's text; a file that is not UTF-8 is an error naming the offset of the first bad byte.
pub fn read_to_string(path: &Path) -> Result<String> {
    String::from_utf8(read(path)?).map_err(|e| {
        Error::format(
            path,
            format!(
                "not UTF-8 text (first bad byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// An I/O error on `path`, in words for the cases whose system message does not say what is wrong.
pub fn error(path: &Path, e: std::io::Error) -> Error {
    // ELOOP; std's ErrorKind::FilesystemLoop is not stable yet. 40 on Linux, 62 on macOS and the BSDs.
    const ELOOP: i32 = if cfg!(target_os = "linux") { 40 } else { 62 };
    if e.raw_os_error() == Some(ELOOP) {
        return Error::format(
            path,
            "a symbolic link loop: following its links never reaches a file",
        );
    }
    if e.kind() == std::io::ErrorKind::IsADirectory {
        return Error::format(path, "is a folder, expected a file");
    }
    Error::io(path, e)
}
