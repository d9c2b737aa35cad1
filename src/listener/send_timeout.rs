//! nginx's `send_timeout`, as an IO wrapper.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::connections::ConnState;
use crate::clock::now_ms;

/// nginx's `send_timeout` for one connection: a write or flush that stays blocked for
/// `limit` fails, which ends the connection (an HTTP/1.1 client that pipelines requests and
/// never reads the answers, an HTTP/2 client that stops reading the socket).
#[derive(Debug)]
pub(super) struct SendTimeout<IO> {
    pub(super) io: IO,
    pub(super) limit: Duration,
    /// Armed while a write is blocked.
    pub(super) blocked: Option<Pin<Box<tokio::time::Sleep>>>,
    pub(super) armed: bool,
    pub(super) state: Arc<ConnState>,
}

impl<IO> SendTimeout<IO> {
    pub(super) fn new(io: IO, limit: Duration, state: Arc<ConnState>) -> Self {
        Self {
            io,
            limit,
            blocked: None,
            armed: false,
            state,
        }
    }

    pub(super) fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            if self.armed {
                self.armed = false;
                self.state.write_blocked_ms.store(0, Ordering::Relaxed);
            }
            return polled;
        }
        let deadline = tokio::time::Instant::now() + self.limit;
        let timer = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
            self.state
                .write_blocked_ms
                .store(now_ms(), Ordering::Relaxed);
        }
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.state.send_timed_out.store(true, Ordering::Relaxed);
                Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()))
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for SendTimeout<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for SendTimeout<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}
