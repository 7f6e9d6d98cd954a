//! The peer's error type: a kind to match on, a message to read, a source chain.

use std::fmt;

/// What went wrong, for programs to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Configuration is missing or invalid.
    Config,
    /// Certificates or TLS.
    Tls,
    /// No directory node could be reached and the route is not cached.
    DirectoryUnavailable,
    /// The directory refused a request.
    DirectoryRejected,
    /// The outbox quota is full and the publisher chose to fail.
    OutboxFull,
    /// A message is larger than allowed.
    TooLarge,
    /// Disk I/O on the outbox or state files.
    Io,
    /// The peer is shut down.
    Closed,
    /// A wait exceeded its deadline.
    Timeout,
    /// A remote broke the protocol.
    Protocol,
}

/// An error of the peer library.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            kind,
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {}", self.message, source),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<weft_proto::tls::TlsError> for Error {
    fn from(e: weft_proto::tls::TlsError) -> Self {
        Error::with_source(ErrorKind::Tls, "TLS", e)
    }
}

impl From<crate::outbox::OutboxError> for Error {
    fn from(e: crate::outbox::OutboxError) -> Self {
        use crate::outbox::OutboxError as O;
        let kind = match &e {
            O::Full { .. } | O::MemoryFull { .. } | O::NeverFits { .. } => ErrorKind::OutboxFull,
            O::TooLarge { .. } => ErrorKind::TooLarge,
            O::Closed => ErrorKind::Closed,
            _ => ErrorKind::Io,
        };
        Error::with_source(kind, "outbox", e)
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
