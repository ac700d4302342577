//! Error types, one per family of operation, each message saying what was wrong and what to do.

use std::fmt;
use std::io;

/// Why a session handle stopped being valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Cancelled,
    Replaced,
    Evicted,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Cancelled => "cancelled",
            EndReason::Replaced => "replaced",
            EndReason::Evicted => "evicted",
        }
    }
}

/// Errors of opening, creating or validating a segment.
#[derive(Debug)]
pub enum SegmentError {
    Io {
        path: String,
        op: &'static str,
        source: io::Error,
    },
    Invalid {
        path: String,
        why: String,
    },
    /// The segment's filesystem has no memory left for the pages an append needed.
    NoSpace {
        path: String,
        source: io::Error,
        /// Bytes the writer may still append after this error (room for an error event).
        reserve: u64,
    },
    Closed,
}

impl fmt::Display for SegmentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SegmentError::Io { path, op, source } => {
                write!(f, "cannot {op} segment {path:?}: {source}")
            }
            SegmentError::Invalid { path, why } => write!(f, "segment {path:?}: {why}"),
            SegmentError::NoSpace {
                path,
                source,
                reserve,
            } => {
                write!(
                    f,
                    "the filesystem of segment {path:?} has no memory left ({source}); nothing \
                     was written. "
                )?;
                if *reserve > 0 {
                    write!(
                        f,
                        "The stream can still be finalized, after at most {reserve} more bytes \
                         (an error event). "
                    )?;
                }
                write!(
                    f,
                    "Free memory there or give it more room (Docker: --shm-size), or lower \
                     max_sessions x session_bytes"
                )
            }
            SegmentError::Closed => write!(f, "the segment was closed; open it again"),
        }
    }
}
impl std::error::Error for SegmentError {}

/// Errors of registry and stream operations.
#[derive(Debug)]
pub enum Error {
    Segment(SegmentError),
    InvalidArgument(String),
    NotFound {
        conversation_id: String,
    },
    Ended(EndReason),
    OffsetLost {
        requested: u64,
        first_available: u64,
    },
    RegistryFull {
        max_sessions: u32,
    },
    /// A create with a quota found its groups already holding `max_running` running sessions.
    QuotaExceeded {
        max_running: u32,
    },
    TooManyProcesses,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Segment(e) => e.fmt(f),
            Error::InvalidArgument(s) => f.write_str(s),
            Error::NotFound { conversation_id } => {
                write!(f, "no live session with conversation id {conversation_id:?}")
            }
            Error::Ended(r) => write!(f, "the session was {}", r.as_str()),
            Error::OffsetLost { requested, first_available } => write!(
                f,
                "offset {requested} was dropped from the ring; the first available offset is {first_available}"
            ),
            Error::RegistryFull { max_sessions } => write!(
                f,
                "all {max_sessions} session slots hold running streams (finished sessions are \
                 evicted to make room); retry once one finishes, or create the segment with a \
                 larger max_sessions"
            ),
            Error::QuotaExceeded { max_running } => write!(
                f,
                "the quota of {max_running} running sessions is reached; retry once one \
                 finishes or is deleted"
            ),
            Error::TooManyProcesses => write!(
                f,
                "more than {} segment handles (one per Segment.open/create, normally one per process) hold readers or notifiers at once; close unused handles",
                crate::layout::MAX_PROCESSES
            ),
        }
    }
}
impl std::error::Error for Error {}

impl Error {
    /// A system call on the segment file at `path` failed while doing `op`.
    pub(crate) fn io(path: &str, op: &'static str, source: io::Error) -> Error {
        Error::Segment(SegmentError::Io {
            path: path.to_string(),
            op,
            source,
        })
    }

    /// The filesystem of the segment at `path` could not back the pages an operation needed;
    /// the writer may still append `reserve` bytes.
    pub(crate) fn no_space(path: &str, source: io::Error, reserve: u64) -> Error {
        Error::Segment(SegmentError::NoSpace {
            path: path.to_string(),
            source,
            reserve,
        })
    }

    /// The file at `path` is not a usable segment, for the reason `why`.
    pub(crate) fn invalid_segment(path: &str, why: impl Into<String>) -> Error {
        Error::Segment(SegmentError::Invalid {
            path: path.to_string(),
            why: why.into(),
        })
    }
}

impl From<SegmentError> for Error {
    fn from(e: SegmentError) -> Error {
        Error::Segment(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;
