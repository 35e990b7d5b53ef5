//! The one error-chain printer (re-exported as `mesh::error`): a chain on one line
//! without repeats, and its innermost cause.

/// An error and its causes on one line, `a: b: c`, less the repeats: a cause whose whole
/// text already ends the line adds nothing (iroh's connect errors wrap one another
/// transparently, which printed "timed out: timed out: timed out"). reqwest's errors say
/// only "error sending request", and the cause (refused, timed out) is in their sources.
///
/// The workspace's one error-chain printer, with [`root_cause`]; everything above this
/// crate reaches both as `mesh::error`. They live here because netcheck is the lowest
/// crate that prints a chain (its report's failure reasons) and cannot see `mesh`.
/// For an `anyhow::Error`, pass `e.as_ref()`: its sources are `{:#}`'s chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if line != text && !line.ends_with(&format!(": {text}")) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// The innermost cause alone ("Connection refused (os error 111)"), for a message that
/// already says what failed in its own words and wants only the why.
pub fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error with a chosen text and cause, for the printers' tests.
    #[derive(Debug)]
    struct Chained(&'static str, Option<Box<Chained>>);

    impl std::fmt::Display for Chained {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Chained {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|c| c as _)
        }
    }

    fn chain(texts: &[&'static str]) -> Chained {
        let mut e = None;
        for t in texts.iter().rev() {
            e = Some(Chained(t, e.map(Box::new)));
        }
        e.unwrap()
    }

    #[test]
    fn error_chain_joins_causes_and_drops_repeats() {
        let e = chain(&["error sending request", "client error (Connect)", "refused"]);
        assert_eq!(
            error_chain(&e),
            "error sending request: client error (Connect): refused"
        );
        let e = chain(&["cannot connect: timed out", "timed out", "timed out"]);
        assert_eq!(error_chain(&e), "cannot connect: timed out");
        // Only a whole cause is dropped, not a word that happens to end the line.
        let e = chain(&["cannot write x", "x"]);
        assert_eq!(error_chain(&e), "cannot write x: x");
        assert_eq!(error_chain(&chain(&["alone"])), "alone");
    }

    #[test]
    fn root_cause_is_the_innermost_text() {
        let e = chain(&["error sending request", "client error (Connect)", "refused"]);
        assert_eq!(root_cause(&e), "refused");
        assert_eq!(root_cause(&chain(&["alone"])), "alone");
    }
}
