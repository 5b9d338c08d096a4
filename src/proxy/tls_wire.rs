//! A TLS session over a TCP socket, as one side of a decrypted tunnel
//! (`relay::Wire`): the relay and the HTTP follower drive it exactly as a
//! plain socket, through a shared reference, one direction reading while
//! the other writes.
//!
//! The rustls session sits behind a short lock taken for each step (never
//! across a wait); readiness is the socket's, so a side with nothing to
//! read holds no buffer, and a read reports `WouldBlock` only once the
//! socket itself did (which is what clears tokio's readiness).
use std::io::{self, Read, Write};
use std::sync::{Mutex, MutexGuard};

use bytes::BytesMut;
use tokio::net::TcpStream;

use super::relay::{self, Wire};

/// Plaintext written to the session per step: the session buffers it as
/// records, which go out before the next step.
const WRITE_STEP: usize = 16 * 1024;
/// Room for one read into a growing buffer.
const READ_STEP: usize = 16 * 1024;

/// A TLS session (client or server side) over its socket, after the
/// handshake.
pub struct TlsWire {
    tcp: TcpStream,
    session: Mutex<rustls::Connection>,
    /// The peer ended without close_notify (a FIN anyone on the path can
    /// forge): a close-delimited message that ends so is not whole.
    unclean_end: std::sync::atomic::AtomicBool,
}

/// The socket as blocking-style IO that never blocks: what rustls reads
/// from and writes to.
struct Sock<'a>(&'a TcpStream);

impl Read for Sock<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Sock<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TlsWire {
    pub fn new(tcp: TcpStream, session: impl Into<rustls::Connection>) -> TlsWire {
        TlsWire {
            tcp,
            session: Mutex::new(session.into()),
            unclean_end: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The socket under the session.
    pub fn socket(&self) -> &TcpStream {
        &self.tcp
    }

    fn lock(&self) -> MutexGuard<'_, rustls::Connection> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hand the socket what the session has for it, without waiting.
    /// `Ok(true)`: nothing is left.
    fn send_pending(&self, session: &mut rustls::Connection) -> io::Result<bool> {
        while session.wants_write() {
            match session.write_tls(&mut Sock(&self.tcp)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Everything the session has for the socket, sent.
    async fn flush(&self) -> io::Result<()> {
        loop {
            if self.send_pending(&mut self.lock())? {
                return Ok(());
            }
            self.tcp.writable().await?;
        }
    }

    /// Whether `try_read` has something to report without the socket:
    /// decrypted bytes, the peer's end, or a TLS error (rustls keeps it;
    /// `try_read` returns it, so a failed session never reads as idle).
    fn has_plaintext(&self) -> bool {
        match self.lock().process_new_packets() {
            Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
            Err(_) => true,
        }
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Wire for TlsWire {
    async fn readable(&self) -> io::Result<()> {
        if self.has_plaintext() {
            return Ok(());
        }
        self.tcp.readable().await
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut session = self.lock();
        // Bounded: each turn either returns or moves the socket's bytes
        // into the session, and the socket ends in WouldBlock or EOF.
        for _ in 0..1024 {
            // A session that failed stays failed (rustls keeps the error):
            // reported before the socket is looked at, with the alert
            // rustls queued sent first.
            if let Err(e) = session.process_new_packets() {
                let _ = self.send_pending(&mut session);
                return Err(tls_error(e));
            }
            match session.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed without close_notify: an end (servers
                // often skip the alert; HTTP frames its own messages), noted
                // for close-delimited ones (`ended_cleanly`).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.unclean_end
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    return Ok(0);
                }
                Err(e) => return Err(e),
            }
            session.read_tls(&mut Sock(&self.tcp))?;
            if let Err(e) = session.process_new_packets() {
                let _ = self.send_pending(&mut session);
                return Err(tls_error(e));
            }
            // A key update or an alert may want an answer.
            self.send_pending(&mut session)?;
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        let start = buf.len();
        buf.resize(start + READ_STEP, 0);
        let read = self.try_read(&mut buf[start..]);
        buf.truncate(start + *read.as_ref().unwrap_or(&0));
        read
    }

    async fn write_all(&self, data: &[u8]) -> io::Result<()> {
        for chunk in data.chunks(WRITE_STEP) {
            self.lock().writer().write_all(chunk)?;
            self.flush().await?;
        }
        Ok(())
    }

    fn shutdown_write(&self) {
        let mut session = self.lock();
        session.send_close_notify();
        let _ = self.send_pending(&mut session);
        drop(session);
        relay::shutdown_write(&self.tcp);
    }

    fn reset(&self) {
        relay::reset(&self.tcp);
    }

    fn ended_cleanly(&self) -> bool {
        !self.unclean_end.load(std::sync::atomic::Ordering::Relaxed)
    }
}
