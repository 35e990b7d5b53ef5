//! SSH settings shared by the agent's server and `myco ssh`'s client, so both ends of
//! a Myco SSH session are tuned alike. Figures behind them: bench/ssh.sh, BENCHMARKS.md.

use std::borrow::Cow;

/// Channel window. 2 MiB keeps a bulk transfer going over the mesh; 16 MiB made
/// OpenSSH's client (through `config-ssh`) queue and zero-fill huge buffers and upload
/// at ~0.55x the speed, 1 MiB slowed both directions (bench/ssh.sh).
pub const WINDOW: u32 = 2 * 1024 * 1024;
/// The largest SSH packet we accept (russh warns above 64 KiB, a TCP-era limit).
pub const MAX_PACKET: u32 = 65535;
/// Messages queued per channel between the session and its reader.
pub const CHANNEL_BUFFER: usize = 1024;
/// Bytes read from a command's output or the user's stdin at a time.
pub const READ_CHUNK: usize = 256 * 1024;

/// The agent's algorithm lists: russh's defaults with AES-128-GCM then AES-256-GCM first
/// (with AES-NI they are cheaper per byte than ChaCha20-Poly1305, which russh and
/// OpenSSH put first; OpenSSH too lists aes128 before aes256), and
/// `none` last, which only `myco ssh` asks for (see [`client_preferred`]).
pub fn server_preferred() -> russh::Preferred {
    let first = [russh::cipher::AES_128_GCM, russh::cipher::AES_256_GCM];
    let mut ciphers = first.to_vec();
    ciphers.extend(
        russh::Preferred::DEFAULT
            .cipher
            .iter()
            .filter(|c| !first.contains(c)),
    );
    ciphers.push(russh::cipher::NONE);
    let mut macs = russh::Preferred::DEFAULT.mac.to_vec();
    macs.push(russh::mac::NONE);
    russh::Preferred {
        cipher: Cow::Owned(ciphers),
        mac: Cow::Owned(macs),
        ..russh::Preferred::DEFAULT
    }
}

/// `myco ssh`'s lists: `none` first. Its SSH stream is one QUIC stream of a connection
/// that is already encrypted and authenticated end to end to the agent's endpoint key
/// (which the ticket names), so SSH's own cipher and MAC would only encrypt twice. The
/// key exchange still runs and the host key is still checked.
pub fn client_preferred() -> russh::Preferred {
    let server = server_preferred();
    let mut ciphers = vec![russh::cipher::NONE];
    ciphers.extend(server.cipher.iter().filter(|c| **c != russh::cipher::NONE));
    let mut macs = vec![russh::mac::NONE];
    macs.extend(server.mac.iter().filter(|m| **m != russh::mac::NONE));
    russh::Preferred {
        cipher: Cow::Owned(ciphers),
        mac: Cow::Owned(macs),
        ..server
    }
}
