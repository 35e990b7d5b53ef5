//! The OpenSSH extensions the SFTP server speaks beyond version 3: rename that
//! replaces, hard links, fsync, statvfs, `~` expansion, user and group names, limits
//! and server-side copy.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use russh_sftp::extensions::{self, LimitsExtension};
use russh_sftp::protocol::{ExtendedReply, Packet, StatusCode};
use russh_sftp::server::{Handler as _, StatusReply};

use super::fs::blocking;
use super::wire::{extended_reply, ok, put_ssh_bytes, ssh_bytes, ssh_string, ssh_u64};
use super::{MAX_IO, MAX_PACKET, Sftp};

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

/// The extensions `init` announces, with OpenSSH's versions: its client checks them
/// (statvfs's is 2).
pub(super) const ANNOUNCED: [(&str, &str); 9] = [
    (POSIX_RENAME, "1"),
    (extensions::FSYNC, "1"),
    (extensions::HARDLINK, "1"),
    (extensions::LIMITS, "1"),
    (extensions::STATVFS, "2"),
    (FSTATVFS, "2"),
    (extensions::EXPAND_PATH, "1"),
    (USERS_GROUPS_BY_ID, "1"),
    (COPY_DATA, "1"),
];

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
    /// Answers an `SSH_FXP_EXTENDED` request named `request`.
    pub(super) async fn extension(
        &mut self,
        id: u32,
        request: String,
        data: Vec<u8>,
    ) -> Result<Packet, StatusReply> {
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
