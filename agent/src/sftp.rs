//! The SFTP subsystem (protocol version 3, as OpenSSH's `sftp` and `scp` speak it),
//! served on an SSH channel by `russh-sftp`, with the workspace's file system behind
//! it. Relative paths start at the home directory, like OpenSSH's `sftp-server`.
//!
//! File I/O is positional (`pread`/`pwrite` on a blocking thread), so one request costs
//! one hop off the async runtime and pipelined requests need no shared file offset.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use russh_sftp::extensions::{self, LimitsExtension};
use russh_sftp::protocol::{
    Attrs, Data, ExtendedReply, File, FileAttributes, Handle as FileHandle, Name, OpenFlags,
    Packet, Status, StatusCode, Version,
};
use russh_sftp::server::StatusReply;
use std::pin::Pin;
use std::task::{Context, Poll};

use russh::server::{Handle, Msg};
use russh::{Channel, ChannelId, ChannelStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::ssh::ChannelSlot;

/// The largest SFTP packet a client may send (a write request with its header).
const MAX_PACKET: u32 = 256 * 1024;
/// The most data one read or write request moves; leaves room for the header.
const MAX_IO: u32 = MAX_PACKET - 1024;
/// Directory entries per `SSH_FXP_NAME` reply.
const DIR_BATCH: usize = 256;
/// OpenSSH's rename that replaces an existing target, as rename(2) does.
const POSIX_RENAME: &str = "posix-rename@openssh.com";
/// `statvfs@openssh.com` on an open file (sftp's `df` uses the path form).
const FSTATVFS: &str = "fstatvfs@openssh.com";
/// User and group names for ids (sftp's `ls -l` shows names with it).
const USERS_GROUPS_BY_ID: &str = "users-groups-by-id@openssh.com";
/// A server-side copy between two open files (sftp's `cp`).
const COPY_DATA: &str = "copy-data";
/// Bytes per read/write of a server-side copy.
const COPY_CHUNK: usize = 1024 * 1024;

/// Serves SFTP on a session channel until the client ends it, then reports exit
/// status 0 (OpenSSH's `scp` counts a missing status as failure). `slot`, the
/// channel's place among its connection's open channels, is kept until then.
pub fn serve(channel: Channel<Msg>, handle: Handle, home: PathBuf, slot: Option<ChannelSlot>) {
    let config = russh_sftp::server::Config {
        max_client_packet_len: MAX_PACKET,
    };
    let handler = Sftp {
        home,
        handles: HashMap::new(),
        next_handle: 0,
    };
    let id = channel.id();
    let stream = SubsystemStream {
        inner: Some(channel.into_stream()),
        handle,
        id,
        _slot: slot,
    };
    // Its protocol loop drops the stream, and with it the slot, when it ends.
    tokio::spawn(russh_sftp::server::run_with_config(stream, handler, config));
}

/// The channel as russh-sftp sees it. russh-sftp stops on end-of-file but retries on
/// other read errors, so a broken channel reads as end-of-file; and when russh-sftp
/// drops the stream, the exit status goes out before the channel closes.
struct SubsystemStream {
    inner: Option<ChannelStream<Msg>>,
    handle: Handle,
    id: ChannelId,
    _slot: Option<ChannelSlot>,
}

impl Drop for SubsystemStream {
    fn drop(&mut self) {
        let (handle, id, inner) = (self.handle.clone(), self.id, self.inner.take());
        tokio::spawn(async move {
            let _ = handle.exit_status_request(id, 0).await;
            let _ = handle.eof(id).await;
            // Dropping the channel stream closes the channel, after the status.
            drop(inner);
        });
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the SFTP channel is closed")
}

impl AsyncRead for SubsystemStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        match Pin::new(inner).poll_read(cx, buf) {
            Poll::Ready(Err(e)) => {
                tracing::debug!("SFTP channel read failed: {e}");
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for SubsystemStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_write(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_flush(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
}

enum Open {
    File(Arc<fs::File>),
    /// A directory listing, read whole at `opendir` and handed out in batches.
    Dir(std::vec::IntoIter<File>),
}

struct Sftp {
    home: PathBuf,
    handles: HashMap<String, Open>,
    next_handle: u64,
}

/// An I/O error as an SFTP status, with the OS's words as the message.
fn status(e: io::Error) -> StatusReply {
    let code = match e.kind() {
        io::ErrorKind::NotFound => StatusCode::NoSuchFile,
        io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        io::ErrorKind::Unsupported => StatusCode::OpUnsupported,
        _ => StatusCode::Failure,
    };
    code.with_message(e.to_string())
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Success".into(),
        language_tag: "en-US".into(),
    }
}

/// Runs blocking file system work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, StatusReply> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(status),
        Err(e) => Err(StatusCode::Failure.with_message(e.to_string())),
    }
}

/// Attributes of a file, with its type (directory, symlink, ...) in the mode bits.
fn attrs(meta: &fs::Metadata) -> FileAttributes {
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

/// One SSH string (u32 length, bytes) at the front of `data`.
fn ssh_string(data: &mut &[u8]) -> Option<String> {
    String::from_utf8(ssh_bytes(data)?.to_vec()).ok()
}

/// One SSH string's bytes at the front of `data`.
fn ssh_bytes<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = ssh_u32(data)? as usize;
    let s = data.get(..len)?;
    *data = &data[len..];
    Some(s)
}

fn ssh_u32(data: &mut &[u8]) -> Option<u32> {
    let v = u32::from_be_bytes(data.get(..4)?.try_into().ok()?);
    *data = &data[4..];
    Some(v)
}

fn ssh_u64(data: &mut &[u8]) -> Option<u64> {
    let v = u64::from_be_bytes(data.get(..8)?.try_into().ok()?);
    *data = &data[8..];
    Some(v)
}

/// Appends `bytes` as an SSH string.
fn put_ssh_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Lengths here are of names and name lists, far below 4 GiB.
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// `~`, `~/x`, `~user` and `~user/x` with the home directories they name (OpenSSH's
/// `expand-path@openssh.com`, which `scp` needs for `~user` paths); anything else as
/// it is.
fn expand_tilde(path: &str, home: &Path) -> io::Result<PathBuf> {
    let Some(rest) = path.strip_prefix('~') else {
        return Ok(PathBuf::from(path));
    };
    let (user, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let dir = if user.is_empty() {
        home.to_owned()
    } else {
        nix::unistd::User::from_name(user)
            .map_err(io::Error::from)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no user {user}")))?
            .dir
    };
    Ok(dir.join(tail))
}

/// The reply to `statvfs@openssh.com`: the file system's figures, as statvfs(3) gives.
fn statvfs_reply(id: u32, st: &nix::sys::statvfs::Statvfs) -> Result<Packet, StatusReply> {
    let reply = extensions::Statvfs {
        block_size: st.block_size(),
        fragment_size: st.fragment_size(),
        blocks: st.blocks(),
        blocks_free: st.blocks_free(),
        blocks_avail: st.blocks_available(),
        inodes: st.files(),
        inodes_free: st.files_free(),
        inodes_avail: st.files_available(),
        fs_id: st.filesystem_id(),
        // The protocol defines read-only (1) and nosuid (2), Linux's values.
        flags: st.flags().bits() & 0x3,
        name_max: st.name_max(),
    };
    extended_reply(id, &reply)
}

/// An `SSH_FXP_EXTENDED_REPLY` carrying `reply` in the protocol's encoding.
fn extended_reply(id: u32, reply: &impl serde::Serialize) -> Result<Packet, StatusReply> {
    let data = russh_sftp::ser::to_bytes(reply)
        .map_err(|e| StatusCode::Failure.with_message(e.to_string()))?
        .to_vec();
    Ok(Packet::ExtendedReply(ExtendedReply { id, data }))
}

/// Copies `len` bytes (0: to the end) of `from` at `at` into `to` at `to_at`.
fn copy_data(from: &fs::File, at: u64, len: u64, to: &fs::File, to_at: u64) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut done = 0u64;
    while len == 0 || done < len {
        let want = if len == 0 {
            COPY_CHUNK
        } else {
            usize::try_from(len - done).map_or(COPY_CHUNK, |left| left.min(COPY_CHUNK))
        };
        let n = from.read_at(&mut buf[..want], at + done)?;
        if n == 0 {
            break;
        }
        to.write_all_at(&buf[..n], to_at + done)?;
        done += n as u64;
    }
    Ok(())
}

impl Sftp {
    fn path(&self, p: &str) -> PathBuf {
        match p {
            "" | "." => self.home.clone(),
            p => self.home.join(p),
        }
    }

    fn insert(&mut self, open: Open) -> String {
        self.next_handle += 1;
        let h = self.next_handle.to_string();
        self.handles.insert(h.clone(), open);
        h
    }

    fn file(&self, handle: &str) -> Result<Arc<fs::File>, StatusReply> {
        match self.handles.get(handle) {
            Some(Open::File(f)) => Ok(f.clone()),
            _ => {
                Err(StatusCode::Failure.with_message(format!("no open file with handle {handle}")))
            }
        }
    }
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
        // With OpenSSH's versions: its client checks them (statvfs's is 2).
        for (ext, version) in [
            (POSIX_RENAME, "1"),
            (extensions::FSYNC, "1"),
            (extensions::HARDLINK, "1"),
            (extensions::LIMITS, "1"),
            (extensions::STATVFS, "2"),
            (FSTATVFS, "2"),
            (extensions::EXPAND_PATH, "1"),
            (USERS_GROUPS_BY_ID, "1"),
            (COPY_DATA, "1"),
        ] {
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
        let bad = || StatusReply::from(StatusCode::BadMessage);
        let mut rest = data.as_slice();
        match request.as_str() {
            POSIX_RENAME => {
                let from = self.path(&ssh_string(&mut rest).ok_or_else(bad)?);
                let to = self.path(&ssh_string(&mut rest).ok_or_else(bad)?);
                blocking(move || fs::rename(from, to)).await?;
            }
            extensions::HARDLINK => {
                let from = self.path(&ssh_string(&mut rest).ok_or_else(bad)?);
                let to = self.path(&ssh_string(&mut rest).ok_or_else(bad)?);
                blocking(move || fs::hard_link(from, to)).await?;
            }
            extensions::FSYNC => {
                let file = self.file(&ssh_string(&mut rest).ok_or_else(bad)?)?;
                blocking(move || file.sync_all()).await?;
            }
            extensions::STATVFS => {
                let path = self.path(&ssh_string(&mut rest).ok_or_else(bad)?);
                let st =
                    blocking(move || nix::sys::statvfs::statvfs(&path).map_err(io::Error::from))
                        .await?;
                return statvfs_reply(id, &st);
            }
            FSTATVFS => {
                let file = self.file(&ssh_string(&mut rest).ok_or_else(bad)?)?;
                let st =
                    blocking(move || nix::sys::statvfs::fstatvfs(&*file).map_err(io::Error::from))
                        .await?;
                return statvfs_reply(id, &st);
            }
            extensions::EXPAND_PATH => {
                let path = ssh_string(&mut rest).ok_or_else(bad)?;
                let home = self.home.clone();
                let expanded = blocking(move || expand_tilde(&path, &home)).await?;
                return self
                    .realpath(id, expanded.to_string_lossy().into_owned())
                    .await
                    .map(Packet::Name);
            }
            USERS_GROUPS_BY_ID => {
                let ids = |list: &[u8]| -> Vec<u32> {
                    list.chunks_exact(4)
                        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                };
                let uids = ids(ssh_bytes(&mut rest).ok_or_else(bad)?);
                let gids = ids(ssh_bytes(&mut rest).ok_or_else(bad)?);
                let data = blocking(move || {
                    // One SSH string per id; an id without a name gets an empty one, as
                    // in OpenSSH.
                    let names = |ids: Vec<u32>, name: &dyn Fn(u32) -> Option<String>| {
                        let mut list = Vec::new();
                        for id in ids {
                            put_ssh_bytes(&mut list, name(id).unwrap_or_default().as_bytes());
                        }
                        list
                    };
                    let users = names(uids, &|uid| {
                        let user = nix::unistd::User::from_uid(uid.into()).ok().flatten();
                        user.map(|u| u.name)
                    });
                    let groups = names(gids, &|gid| {
                        let group = nix::unistd::Group::from_gid(gid.into()).ok().flatten();
                        group.map(|g| g.name)
                    });
                    let mut data = Vec::new();
                    put_ssh_bytes(&mut data, &users);
                    put_ssh_bytes(&mut data, &groups);
                    Ok(data)
                })
                .await?;
                return Ok(Packet::ExtendedReply(ExtendedReply { id, data }));
            }
            COPY_DATA => {
                let from = self.file(&ssh_string(&mut rest).ok_or_else(bad)?)?;
                let at = ssh_u64(&mut rest).ok_or_else(bad)?;
                let len = ssh_u64(&mut rest).ok_or_else(bad)?;
                let to = self.file(&ssh_string(&mut rest).ok_or_else(bad)?)?;
                let to_at = ssh_u64(&mut rest).ok_or_else(bad)?;
                blocking(move || copy_data(&from, at, len, &to, to_at)).await?;
            }
            extensions::LIMITS => {
                let limits = LimitsExtension {
                    max_packet_len: MAX_PACKET.into(),
                    max_read_len: MAX_IO.into(),
                    max_write_len: MAX_IO.into(),
                    max_open_handles: 0,
                };
                return extended_reply(id, &limits);
            }
            other => {
                return Err(StatusCode::OpUnsupported
                    .with_message(format!("extension {other} is not supported")));
            }
        }
        Ok(Packet::Status(ok(id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_strings_parse_in_sequence() {
        let mut data = Vec::new();
        for s in ["a/b", "c"] {
            data.extend_from_slice(&(s.len() as u32).to_be_bytes());
            data.extend_from_slice(s.as_bytes());
        }
        let mut rest = data.as_slice();
        assert_eq!(ssh_string(&mut rest).as_deref(), Some("a/b"));
        assert_eq!(ssh_string(&mut rest).as_deref(), Some("c"));
        assert_eq!(ssh_string(&mut rest), None);
    }

    #[test]
    fn attrs_carry_the_file_type() {
        let dir = std::env::temp_dir();
        let a = attrs(&fs::metadata(&dir).unwrap());
        assert!(a.is_dir());
    }
}
