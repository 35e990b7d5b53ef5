//! The workspace's file system behind SFTP version 3's requests: opens, positional
//! reads and writes, attributes, directories, links and renames.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle as FileHandle, Name, OpenFlags, Packet, Status,
    StatusCode, Version,
};
use russh_sftp::server::StatusReply;

use super::wire::{ok, status};
use super::{MAX_IO, Open, Sftp};

/// Directory entries per `SSH_FXP_NAME` reply.
const DIR_BATCH: usize = 256;

/// Runs blocking file system work off the async runtime.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, StatusReply> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(status),
        Err(e) => Err(StatusCode::Failure.with_message(e.to_string())),
    }
}

/// Attributes of a file, with its type (directory, symlink, ...) in the mode bits.
pub(super) fn attrs(meta: &fs::Metadata) -> FileAttributes {
    FileAttributes {
        size: Some(meta.len()),
        uid: Some(meta.uid()),
        gid: Some(meta.gid()),
        permissions: Some(meta.mode()),
        atime: Some(u32::try_from(meta.atime().max(0)).unwrap_or(u32::MAX)),
        mtime: Some(u32::try_from(meta.mtime().max(0)).unwrap_or(u32::MAX)),
        ..Default::default()
    }
}

/// What `setstat` (a path) or `fsetstat` (an open file) changes.
enum Target<'a> {
    Path(&'a Path),
    File(&'a fs::File),
}

/// Applies the attributes a client set, in OpenSSH's order (size, mode, times, owner),
/// without opening the file: that would fail on mode 000 and block on a FIFO.
fn apply(target: Target<'_>, a: &FileAttributes) -> io::Result<()> {
    use nix::sys::time::TimeSpec;
    if let Some(size) = a.size {
        let len = i64::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        match target {
            Target::File(f) => f.set_len(size)?,
            Target::Path(p) => nix::unistd::truncate(p, len)?,
        }
    }
    if let Some(mode) = a.permissions {
        let perms = fs::Permissions::from_mode(mode & 0o7777);
        match target {
            Target::File(f) => f.set_permissions(perms)?,
            Target::Path(p) => fs::set_permissions(p, perms)?,
        }
    }
    if let (Some(atime), Some(mtime)) = (a.atime, a.mtime) {
        match target {
            Target::File(f) => f.set_times(
                fs::FileTimes::new()
                    .set_accessed(UNIX_EPOCH + Duration::from_secs(atime.into()))
                    .set_modified(UNIX_EPOCH + Duration::from_secs(mtime.into())),
            )?,
            Target::Path(p) => nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                p,
                &TimeSpec::new(atime.into(), 0),
                &TimeSpec::new(mtime.into(), 0),
                nix::sys::stat::UtimensatFlags::FollowSymlink,
            )?,
        }
    }
    if a.uid.is_some() || a.gid.is_some() {
        match target {
            Target::File(f) => std::os::unix::fs::fchown(f, a.uid, a.gid)?,
            Target::Path(p) => std::os::unix::fs::chown(p, a.uid, a.gid)?,
        }
    }
    Ok(())
}

impl russh_sftp::server::Handler for Sftp {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported.into()
    }

    async fn init(
        &mut self,
        version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        tracing::debug!(version, "SFTP session started");
        let mut v = Version::new();
        for (ext, version) in super::extensions::ANNOUNCED {
            v.extensions.insert(ext.into(), version.into());
        }
        Ok(v)
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<FileHandle, Self::Error> {
        let path = self.path(&filename);
        let mut opts: OpenOptions = pflags.into();
        // Without WRITE, APPEND or CREATE std refuses the open; SFTP means "read".
        if !pflags.intersects(OpenFlags::WRITE | OpenFlags::APPEND) {
            opts.read(true);
        }
        opts.mode(attrs.permissions.map_or(0o666, |m| m & 0o7777));
        let file = blocking(move || opts.open(path)).await?;
        let handle = self.insert(Open::File(Arc::new(file)));
        Ok(FileHandle { id, handle })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(_) => Ok(ok(id)),
            None => Err(StatusCode::Failure.with_message(format!("no open handle {handle}"))),
        }
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let file = self.file(&handle)?;
        let len = len.min(MAX_IO) as usize;
        let data = blocking(move || {
            let mut buf = vec![0u8; len];
            let mut filled = 0;
            // A short read is not the end of the file; read until full or EOF.
            while filled < len {
                match file.read_at(&mut buf[filled..], offset + filled as u64) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            buf.truncate(filled);
            Ok(buf)
        })
        .await?;
        if data.is_empty() && len > 0 {
            return Err(StatusCode::Eof.into());
        }
        Ok(Data { id, data })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        let file = self.file(&handle)?;
        blocking(move || file.write_all_at(&data, offset)).await?;
        Ok(ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let path = self.path(&path);
        let meta = blocking(move || fs::symlink_metadata(path)).await?;
        Ok(Attrs {
            id,
            attrs: attrs(&meta),
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let path = self.path(&path);
        let meta = blocking(move || fs::metadata(path)).await?;
        Ok(Attrs {
            id,
            attrs: attrs(&meta),
        })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let file = self.file(&handle)?;
        let meta = blocking(move || file.metadata()).await?;
        Ok(Attrs {
            id,
            attrs: attrs(&meta),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let path = self.path(&path);
        blocking(move || apply(Target::Path(&path), &attrs)).await?;
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let file = self.file(&handle)?;
        blocking(move || apply(Target::File(&file), &attrs)).await?;
        Ok(ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<FileHandle, Self::Error> {
        let path = self.path(&path);
        let entries = blocking(move || {
            let mut out = Vec::new();
            for name in [".", ".."] {
                if let Ok(meta) = fs::metadata(path.join(name)) {
                    out.push(File::new(name, attrs(&meta)));
                }
            }
            for entry in fs::read_dir(&path)? {
                let entry = entry?;
                let Ok(meta) = entry.path().symlink_metadata() else {
                    continue; // vanished while listing
                };
                out.push(File::new(
                    entry.file_name().to_string_lossy().into_owned(),
                    attrs(&meta),
                ));
            }
            Ok(out)
        })
        .await?;
        let handle = self.insert(Open::Dir(entries.into_iter()));
        Ok(FileHandle { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        let Some(Open::Dir(entries)) = self.handles.get_mut(&handle) else {
            return Err(
                StatusCode::Failure.with_message(format!("no open directory with handle {handle}"))
            );
        };
        let files: Vec<File> = entries.by_ref().take(DIR_BATCH).collect();
        if files.is_empty() {
            return Err(StatusCode::Eof.into());
        }
        Ok(Name { id, files })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        let path = self.path(&filename);
        blocking(move || fs::remove_file(path)).await?;
        Ok(ok(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let path = self.path(&path);
        blocking(move || {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .mode(attrs.permissions.map_or(0o777, |m| m & 0o7777))
                .create(path)
        })
        .await?;
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        let path = self.path(&path);
        blocking(move || fs::remove_dir(path)).await?;
        Ok(ok(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let path = self.path(&path);
        // Like OpenSSH's, a path whose last part does not exist yet resolves (clients
        // normalize an upload's target before creating it).
        let real = blocking(move || match fs::canonicalize(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                    return Err(e);
                };
                Ok(fs::canonicalize(parent)?.join(name))
            }
            other => other,
        })
        .await?;
        Ok(Name {
            id,
            files: vec![File::dummy(real.to_string_lossy())],
        })
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        let (from, to) = (self.path(&oldpath), self.path(&newpath));
        // SFTP v3's rename must not replace an existing file (posix-rename does).
        blocking(move || {
            if to.symlink_metadata().is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists", to.display()),
                ));
            }
            fs::rename(from, to)
        })
        .await?;
        Ok(ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let path = self.path(&path);
        let target = blocking(move || fs::read_link(path)).await?;
        Ok(Name {
            id,
            files: vec![File::dummy(target.to_string_lossy())],
        })
    }

    /// OpenSSH sends the target first and the link second, the reverse of the draft's
    /// field names; we follow OpenSSH, whose clients are the ones that matter.
    async fn symlink(
        &mut self,
        id: u32,
        linkpath: String,
        targetpath: String,
    ) -> Result<Status, Self::Error> {
        let (target, link) = (PathBuf::from(linkpath), self.path(&targetpath));
        blocking(move || std::os::unix::fs::symlink(target, link)).await?;
        Ok(ok(id))
    }

    async fn extended(
        &mut self,
        id: u32,
        request: String,
        data: Vec<u8>,
    ) -> Result<Packet, Self::Error> {
        self.extension(id, request, data).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_carry_the_file_type() {
        let dir = std::env::temp_dir();
        let a = attrs(&fs::metadata(&dir).unwrap());
        assert!(a.is_dir());
    }
}
