//! [`LazyError`]: what went wrong on the lazy page path (relays, the target's
//! lazy-pages daemon, the pull and push of pages). Each variant names its input; the
//! cause of an I/O failure is its `source()`, not part of its text.

use std::path::PathBuf;

use away_model::ErrorChain;

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// A socket, pipe or process step; `what` names the step and its peer.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A file of the checkpoint.
    #[error("cannot {action} {path}")]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A relay task panicked or was cancelled.
    #[error("the {task} task ended abnormally")]
    Task {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("aborted before the target connected")]
    AbortedBeforeConnect,
    #[error("aborted")]
    Aborted,
    #[error("{what} within {secs} s")]
    NotWithin { what: &'static str, secs: u64 },
    #[error("nothing from {peer} for {secs} s")]
    Idle { peer: &'static str, secs: u64 },
    #[error("the target's connection ended before the last page")]
    EndedBeforeLastPage,
    /// The source relay's injected fault (end-to-end tests).
    #[error("link cut after {sent} bytes of pages (injected fault)")]
    FaultCut { sent: u64 },
    #[error("corrupt page stream: {reason}")]
    Corrupt { reason: String },
    #[error("unexpected page server request {cmd:#x} from the daemon")]
    UnexpectedRequest { cmd: u32 },
    /// The first record of an early page link (`early::Offer`), or one that does not fit
    /// the move or its checkpoint.
    #[error("the source's page offer: {reason}")]
    BadOffer { reason: String },
    #[error("the source sent an answer nobody asked for")]
    UnaskedAnswer,
    #[error("the source's page server answered the end with {status:?}")]
    BadEndStatus { status: [u8; 4] },
    #[error("the source answered {got} pages at {at:#x} for {pages} at {vaddr:#x} (its page server lost track)")]
    LostTrack { got: u64, at: u64, pages: u64, vaddr: u64 },
    /// A page count from the source above what was asked: refused before any buffer is sized.
    #[error("the source answered {got} pages at {vaddr:#x} where at most {asked} were asked")]
    TooManyPages { got: u64, asked: u64, vaddr: u64 },
    /// A received pagemap announces more pages than the disk can take.
    #[error("the checkpoint announces {pages} lazy pages ({bytes} bytes), more than the {free} bytes free in {dir}")]
    TooLarge { pages: u64, bytes: u64, free: u64, dir: PathBuf },
    /// A file of a received checkpoint that is not where it must be (a link, outside).
    #[error(transparent)]
    Beneath(#[from] away_runtime::host::beneath::BeneathError),
    #[error("criu lazy-pages exited with {status}{log}")]
    DaemonExited { status: std::process::ExitStatus, log: String },
    #[error("no single pagemap image in {dir} (one process per container)")]
    NoSinglePagemap { dir: PathBuf },
    #[error("{path} is not a pagemap image")]
    NotPagemap { path: PathBuf },
    #[error("{path} is missing")]
    Missing { path: PathBuf },
    #[error("the pages image is shorter than its pagemap")]
    ShortPagesImage,
    /// The pull stopped (`pipe`: what the puller saw) because its relay failed (the source).
    #[error("{}", ErrorChain(&**.pipe))]
    Pull {
        pipe: Box<LazyError>,
        #[source]
        relay: Box<LazyError>,
    },
}

impl LazyError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LazyError {
        let what = what.into();
        move |source| LazyError::Io { what, source }
    }

    pub(crate) fn file(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LazyError {
        let path = path.into();
        move |source| LazyError::File { action, path, source }
    }

    pub(crate) fn task(task: &'static str) -> impl FnOnce(tokio::task::JoinError) -> LazyError {
        move |source| LazyError::Task { task, source }
    }
}
