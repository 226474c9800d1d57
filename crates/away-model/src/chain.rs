//! An error and its causes as one line, for the places where an error becomes text
//! (a wire message, an event, a log line): library errors show their own context and
//! leave the cause to `source()`, so `to_string()` alone would drop it.

use std::error::Error;
use std::fmt;

/// Displays `error: cause: cause of the cause`, like anyhow's `{:#}`.
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

/// [`ErrorChain`] as a `String`.
pub fn error_chain(error: &(dyn Error + 'static)) -> String {
    ErrorChain(error).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {path}")]
    struct Outer {
        path: String,
        source: std::io::Error,
    }

    #[test]
    fn every_cause_once() {
        let e = Outer { path: "/x".into(), source: std::io::Error::other("boom") };
        assert_eq!(error_chain(&e), "cannot read /x: boom");
        assert_eq!(error_chain(&std::io::Error::other("alone")), "alone");
    }
}
