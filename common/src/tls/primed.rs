//! A client connection that has heard from the server before it is handed
//! to HTTP/2.
//!
//! With TLS 1.3 the client's side of the handshake ends before the server
//! has checked the client certificate, so a refused certificate arrives
//! later, as an alert on the first read. Left to HTTP/2, that read races
//! the first call: when the alert wins, the channel reconnects (the
//! handshake "succeeds" again), and a call can go round that loop without
//! end. Reading the server's first bytes here (its HTTP/2 SETTINGS, which
//! it sends unprompted) turns a refusal into a failed connect, and the
//! bytes are replayed to HTTP/2 afterwards.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// A stream with the bytes already read from it in front.
pub struct Primed<S> {
    head: Vec<u8>,
    served: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> Primed<S> {
    /// Waits for the server's first bytes. An alert (a refused
    /// certificate), a reset or a close before any byte is an error, with
    /// the TLS error kept as its source.
    pub async fn first_bytes(mut inner: S) -> io::Result<Self> {
        let mut head = vec![0; 1024];
        let read = inner.read(&mut head).await?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the coordinator closed the connection right after the TLS handshake",
            ));
        }
        head.truncate(read);
        Ok(Primed {
            head,
            served: 0,
            inner,
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Primed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.served < this.head.len() {
            let rest = &this.head[this.served..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.served += n;
            if this.served == this.head.len() {
                this.head = Vec::new();
                this.served = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Primed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn the_first_bytes_are_replayed_before_the_rest() {
        let (mut server, client) = tokio::io::duplex(64);
        server.write_all(b"settings").await.expect("write");
        let mut primed = Primed::first_bytes(client).await.expect("first bytes");
        server.write_all(b" and more").await.expect("write");
        drop(server);
        let mut all = String::new();
        primed.read_to_string(&mut all).await.expect("read");
        assert_eq!(all, "settings and more");
    }

    #[tokio::test]
    async fn a_close_before_any_byte_is_an_error() {
        let (server, client) = tokio::io::duplex(64);
        drop(server);
        let error = Primed::first_bytes(client)
            .await
            .err()
            .expect("a close before any byte fails");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }
}
