//! The SFTP protocol loop on an SSH channel: a request in, its reply out, until the
//! client ends the session; then the exit status. russh-sftp's own loop
//! (`run_with_config`) spawns a task nobody owns, so the agent runs this one instead,
//! inside the SSH connection's tasks.

use std::io;

use bytes::Bytes;
use russh::server::{Handle, Msg};
use russh::{Channel, ChannelStream};
use russh_sftp::protocol::{Packet, Status, StatusCode};
use russh_sftp::server::{Handler, StatusReply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{MAX_PACKET, Sftp};

/// Serves `sftp`'s requests on the channel until the client closes it (or sends what
/// cannot be read), then reports exit status 0 before the channel closes, as OpenSSH's
/// `scp` requires.
pub(super) async fn run(channel: Channel<Msg>, handle: Handle, mut sftp: Sftp) {
    let id = channel.id();
    let mut stream = channel.into_stream();
    loop {
        let mut packet = match read_packet(&mut stream).await {
            Ok(Some(packet)) => packet,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("SFTP channel read failed: {e}");
                break;
            }
        };
        let reply = match Packet::try_from(&mut packet) {
            Ok(request) => dispatch(&mut sftp, request).await,
            Err(_) => Packet::error(0, StatusCode::BadMessage),
        };
        let reply = match Bytes::try_from(reply) {
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!("cannot encode an SFTP reply: {e}");
                continue;
            }
        };
        let sent = match stream.write_all(&reply).await {
            Ok(()) => stream.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            tracing::debug!("SFTP channel write failed: {e}");
            break;
        }
    }
    tracing::debug!("SFTP session ended");
    let _ = handle.exit_status_request(id, 0).await;
    let _ = handle.eof(id).await;
    // Dropping the channel stream closes the channel, after the status.
    drop(stream);
}

/// One packet's bytes (after its length), or None at the end of the channel.
async fn read_packet(stream: &mut ChannelStream<Msg>) -> io::Result<Option<Bytes>> {
    let len = match stream.read_u32().await {
        Ok(len) => len,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    if len > MAX_PACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the client sent a packet of {len} bytes, over the {MAX_PACKET} allowed"),
        ));
    }
    let mut buf = vec![0; len as usize];
    match stream.read_exact(&mut buf).await {
        Ok(_) => Ok(Some(buf.into())),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// The reply to one request, as russh-sftp's own loop makes it.
async fn dispatch(h: &mut Sftp, packet: Packet) -> Packet {
    let id = packet.get_request_id();
    match packet {
        Packet::Init(p) => reply(id, h.init(p.version, p.extensions).await),
        Packet::Open(p) => reply(id, h.open(p.id, p.filename, p.pflags, p.attrs).await),
        Packet::Close(p) => reply(id, h.close(p.id, p.handle).await),
        Packet::Read(p) => reply(id, h.read(p.id, p.handle, p.offset, p.len).await),
        Packet::Write(p) => reply(id, h.write(p.id, p.handle, p.offset, p.data).await),
        Packet::Lstat(p) => reply(id, h.lstat(p.id, p.path).await),
        Packet::Fstat(p) => reply(id, h.fstat(p.id, p.handle).await),
        Packet::SetStat(p) => reply(id, h.setstat(p.id, p.path, p.attrs).await),
        Packet::FSetStat(p) => reply(id, h.fsetstat(p.id, p.handle, p.attrs).await),
        Packet::OpenDir(p) => reply(id, h.opendir(p.id, p.path).await),
        Packet::ReadDir(p) => reply(id, h.readdir(p.id, p.handle).await),
        Packet::Remove(p) => reply(id, h.remove(p.id, p.filename).await),
        Packet::MkDir(p) => reply(id, h.mkdir(p.id, p.path, p.attrs).await),
        Packet::RmDir(p) => reply(id, h.rmdir(p.id, p.path).await),
        Packet::RealPath(p) => reply(id, h.realpath(p.id, p.path).await),
        Packet::Stat(p) => reply(id, h.stat(p.id, p.path).await),
        Packet::Rename(p) => reply(id, h.rename(p.id, p.oldpath, p.newpath).await),
        Packet::ReadLink(p) => reply(id, h.readlink(p.id, p.path).await),
        Packet::Symlink(p) => reply(id, h.symlink(p.id, p.linkpath, p.targetpath).await),
        Packet::Extended(p) => reply(id, h.extended(p.id, p.request, p.data).await),
        _ => Packet::error(0, StatusCode::BadMessage),
    }
}

/// A handler's answer as a packet: its reply, or a status carrying its error.
fn reply<T: Into<Packet>>(id: u32, answer: Result<T, StatusReply>) -> Packet {
    match answer {
        Ok(reply) => reply.into(),
        Err(StatusReply {
            status_code,
            error_message,
            language_tag,
        }) => Packet::Status(Status {
            id,
            status_code,
            error_message: error_message.unwrap_or_else(|| status_code.to_string()),
            language_tag: language_tag.unwrap_or_else(|| "en-US".to_owned()),
        }),
    }
}
