//! SFTP's encodings the russh-sftp crate leaves to us: the SSH strings and integers
//! inside extension requests, and statuses and extended replies.

use std::io;

use russh_sftp::protocol::{ExtendedReply, Packet, Status, StatusCode};
use russh_sftp::server::StatusReply;

/// An I/O error as an SFTP status, with the OS's words as the message.
pub(super) fn status(e: io::Error) -> StatusReply {
    let code = match e.kind() {
        io::ErrorKind::NotFound => StatusCode::NoSuchFile,
        io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        io::ErrorKind::Unsupported => StatusCode::OpUnsupported,
        _ => StatusCode::Failure,
    };
    code.with_message(e.to_string())
}

pub(super) fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Success".into(),
        language_tag: "en-US".into(),
    }
}

/// One SSH string (u32 length, bytes) at the front of `data`.
pub(super) fn ssh_string(data: &mut &[u8]) -> Option<String> {
    String::from_utf8(ssh_bytes(data)?.to_vec()).ok()
}

/// One SSH string's bytes at the front of `data`.
pub(super) fn ssh_bytes<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = ssh_u32(data)? as usize;
    let s = data.get(..len)?;
    *data = &data[len..];
    Some(s)
}

/// One big-endian u32 at the front of `data`.
fn ssh_u32(data: &mut &[u8]) -> Option<u32> {
    let v = u32::from_be_bytes(data.get(..4)?.try_into().ok()?);
    *data = &data[4..];
    Some(v)
}

/// One big-endian u64 at the front of `data`.
pub(super) fn ssh_u64(data: &mut &[u8]) -> Option<u64> {
    let v = u64::from_be_bytes(data.get(..8)?.try_into().ok()?);
    *data = &data[8..];
    Some(v)
}

/// Appends `bytes` as an SSH string.
pub(super) fn put_ssh_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Lengths here are of names and name lists, far below 4 GiB.
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// An `SSH_FXP_EXTENDED_REPLY` carrying `reply` in the protocol's encoding.
pub(super) fn extended_reply(
    id: u32,
    reply: &impl serde::Serialize,
) -> Result<Packet, StatusReply> {
    let data = russh_sftp::ser::to_bytes(reply)
        .map_err(|e| StatusCode::Failure.with_message(e.to_string()))?
        .to_vec();
    Ok(Packet::ExtendedReply(ExtendedReply { id, data }))
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
}
