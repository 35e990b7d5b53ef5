//! The SFTP subsystem (protocol version 3, as OpenSSH's `sftp` and `scp` speak it),
//! served on an SSH channel with `russh-sftp`'s packets, with the workspace's file
//! system behind it. Relative paths start at the home directory, like OpenSSH's `sftp-server`.
//!
//! File I/O is positional (`pread`/`pwrite` on a blocking thread), so one request costs
//! one hop off the async runtime and pipelined requests need no shared file offset.
//!
//! `channel.rs` is the protocol loop on the SSH channel, `fs.rs` the requests
//! of version 3, `extensions.rs` OpenSSH's extensions, `wire.rs` the encodings they
//! share.

mod channel;
mod extensions;
mod fs;
mod wire;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use russh::Channel;
use russh::server::{Handle, Msg};
use russh_sftp::protocol::{File, StatusCode};
use russh_sftp::server::StatusReply;

use crate::ssh::ChannelSlot;

/// The largest SFTP packet a client may send (a write request with its header).
const MAX_PACKET: u32 = 256 * 1024;
/// The most data one read or write request moves; leaves room for the header.
const MAX_IO: u32 = MAX_PACKET - 1024;

/// Serves SFTP on a session channel until the client ends it, then reports exit
/// status 0 (OpenSSH's `scp` counts a missing status as failure). `slot`, the
/// channel's place among its connection's open channels, is kept until then.
///
/// # Cancel safety
/// Dropping it ends the session at once, without the exit status: the SSH connection
/// it is one of the tasks of has ended.
pub async fn serve(
    channel: Channel<Msg>,
    handle: Handle,
    home: PathBuf,
    slot: Option<ChannelSlot>,
) {
    let _slot = slot;
    let sftp = Sftp {
        home,
        handles: HashMap::new(),
        next_handle: 0,
    };
    channel::run(channel, handle, sftp).await;
}

/// What an SFTP handle names.
enum Open {
    File(Arc<std::fs::File>),
    /// A directory listing, read whole at `opendir` and handed out in batches.
    Dir(std::vec::IntoIter<File>),
}

/// One SFTP session: its home directory and the handles it has open.
struct Sftp {
    home: PathBuf,
    handles: HashMap<String, Open>,
    next_handle: u64,
}

impl Sftp {
    /// A client's path: a relative one starts at the home directory.
    fn path(&self, p: &str) -> PathBuf {
        match p {
            "" | "." => self.home.clone(),
            p => self.home.join(p),
        }
    }

    /// A new handle for `open`.
    fn insert(&mut self, open: Open) -> String {
        self.next_handle += 1;
        let h = self.next_handle.to_string();
        self.handles.insert(h.clone(), open);
        h
    }

    /// The open file `handle` names.
    fn file(&self, handle: &str) -> Result<Arc<std::fs::File>, StatusReply> {
        match self.handles.get(handle) {
            Some(Open::File(f)) => Ok(f.clone()),
            _ => {
                Err(StatusCode::Failure.with_message(format!("no open file with handle {handle}")))
            }
        }
    }
}
