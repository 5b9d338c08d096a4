//! The original destination of a REDIRECTed connection: SO_ORIGINAL_DST
//! (IPv4) and IP6T_SO_ORIGINAL_DST (IPv6), read through socket2. One small
//! function, so everything around it also runs without iptables.
use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// Where the client meant to go before netfilter redirected it here.
#[cfg(target_os = "linux")]
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr()?;
    let addr = if local.is_ipv4() {
        sock.original_dst()?
    } else {
        sock.original_dst_ipv6()?
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "original destination is not IP"))
}

#[cfg(not(target_os = "linux"))]
pub fn original_dst(_stream: &TcpStream) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "transparent mode needs Linux netfilter",
    ))
}
