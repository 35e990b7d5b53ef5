//! What a scrape answers: the exposition format the scraper asked for, and the body,
//! whose chunks are sent as they are.

use std::collections::VecDeque;

use axum::http::{HeaderMap, header};
use bytes::Bytes;

/// The exposition format of a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0, when the scraper's Accept asks for it (Prometheus does).
    OpenMetrics,
    /// The classic text format 0.0.4 (what `promtool check metrics` lints).
    Classic,
}

impl Format {
    /// Negotiated like the Go client: OpenMetrics only when asked for.
    pub fn from_accept(headers: &HeaderMap) -> Self {
        let asks = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("application/openmetrics-text"));
        if asks {
            Self::OpenMetrics
        } else {
            Self::Classic
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// A scrape's body: its chunks are sent as they are, so family blocks no agent changed
/// since the last scrape go out again without being copied.
#[derive(Debug, Clone, Default)]
pub struct ScrapeBody {
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    len: usize,
}

impl ScrapeBody {
    pub(super) fn new(chunks: Vec<Bytes>) -> Self {
        let chunks: VecDeque<Bytes> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
        let len = chunks.iter().map(Bytes::len).sum();
        Self { chunks, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole body in one buffer (a copy).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for c in &self.chunks {
            out.extend_from_slice(c);
        }
        out
    }
}

impl http_body::Body for ScrapeBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let chunk = this.chunks.pop_front().map(|c| {
            this.len -= c.len();
            Ok(http_body::Frame::data(c))
        });
        std::task::Poll::Ready(chunk)
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.len as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_asked_for() {
        let mut h = HeaderMap::new();
        assert_eq!(Format::from_accept(&h), Format::Classic);
        h.insert(
            header::ACCEPT,
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4"
                .parse()
                .unwrap(),
        );
        assert_eq!(Format::from_accept(&h), Format::OpenMetrics);
    }
}
