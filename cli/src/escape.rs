//! OpenSSH's escape sequences for `myco ssh` on a terminal: `~` typed at the start of
//! a line begins one. `~.` ends the session (for a link that hangs), `~?` lists them,
//! `~~` sends one `~`; `~` before anything else is sent as typed.

use bytes::Bytes;

/// What the typed input asks for besides the bytes to send.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// `~.`: end the session now.
    Disconnect,
    /// `~?`: show the escapes.
    Help,
}

/// Printed for `~?` (the terminal is in raw mode, hence `\r\n`).
pub const HELP: &str = "Supported escape sequences:\r\n \
    ~.   - terminate connection\r\n \
    ~?   - this message\r\n \
    ~~   - send the escape character by typing it twice\r\n\
    (Note that escapes are only recognized immediately after newline.)\r\n";

/// The escape state across reads of the terminal.
#[derive(Debug)]
pub struct Escapes {
    /// The last byte sent ended a line (or nothing was sent yet).
    line_start: bool,
    /// A `~` at a line start was held back, waiting for the next byte.
    pending: bool,
}

impl Default for Escapes {
    fn default() -> Self {
        Self {
            line_start: true,
            pending: false,
        }
    }
}

fn ends_line(b: u8) -> bool {
    b == b'\r' || b == b'\n'
}

impl Escapes {
    /// Splits typed input into what goes to the session and an action; bytes after
    /// `~.` are dropped. Input without a `~` to look at passes through uncopied.
    pub fn feed(&mut self, data: Bytes) -> (Bytes, Option<Action>) {
        if !self.pending && !data.contains(&b'~') {
            if let Some(&last) = data.last() {
                self.line_start = ends_line(last);
            }
            return (data, None);
        }
        let mut out = Vec::with_capacity(data.len() + 1);
        let mut action = None;
        for &b in data.iter() {
            if self.pending {
                self.pending = false;
                match b {
                    b'.' => return (Bytes::from(out), Some(Action::Disconnect)),
                    b'?' => {
                        action = Some(Action::Help);
                        continue;
                    }
                    b'~' => {
                        out.push(b'~');
                        self.line_start = false;
                        continue;
                    }
                    _ => out.push(b'~'),
                }
            } else if self.line_start && b == b'~' {
                self.pending = true;
                continue;
            }
            out.push(b);
            self.line_start = ends_line(b);
        }
        (Bytes::from(out), action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(e: &mut Escapes, s: &str) -> (String, Option<Action>) {
        let (out, action) = e.feed(Bytes::copy_from_slice(s.as_bytes()));
        (String::from_utf8(out.to_vec()).unwrap(), action)
    }

    #[test]
    fn escapes_only_at_the_start_of_a_line() {
        let mut e = Escapes::default();
        assert_eq!(feed(&mut e, "ls ~/x\r"), ("ls ~/x\r".into(), None));
        assert_eq!(feed(&mut e, "~"), (String::new(), None), "held back");
        assert_eq!(feed(&mut e, "~"), ("~".into(), None), "~~ sends one");
        assert_eq!(
            feed(&mut e, "~."),
            ("~.".into(), None),
            "not at a line start"
        );
        assert_eq!(feed(&mut e, "\r~?"), ("\r".into(), Some(Action::Help)));
        assert_eq!(feed(&mut e, "~/bin\r"), ("~/bin\r".into(), None));
        assert_eq!(
            feed(&mut e, "~.rest"),
            (String::new(), Some(Action::Disconnect))
        );
        let mut e = Escapes::default();
        assert_eq!(
            feed(&mut e, "echo\n~."),
            ("echo\n".into(), Some(Action::Disconnect))
        );
    }
}
