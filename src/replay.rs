//! `chatwall classify pcap`: every TCP flow of a capture (pcap or pcapng),
//! reassembled and put through the decisions the proxy makes on a
//! redirected (transparent) connection, with one verdict per flow.
//!
//! This module owns:
//! - reading captures: pcap and pcapng, link types Ethernet (with VLAN
//!   tags), Linux cooked capture v1 and v2, raw IPv4/IPv6 and BSD loopback;
//! - TCP reassembly: flows keyed by their 4-tuple, the client being the side
//!   that sent the SYN (or the first packet's sender when the SYN is not in
//!   the capture); each direction ordered by sequence number, retransmitted
//!   and overlapping bytes kept as they first arrived, capped at what
//!   inspection can use;
//! - the pure part of a tunnel's decision, shared with (and mirroring)
//!   `proxy::tunnel` and `proxy::explicit`: the destination checks
//!   ([`decide_destination`]), the first-bytes state machine
//!   ([`FirstBytesCheck`]: TLS ClientHello, HTTP, anything else,
//!   `non_tls_on_443`, `non_http_on_80`, ECH), each HTTP request
//!   ([`decide_request`], with a [`HeadView`] over an httparse request) and
//!   payload signatures in both directions ([`decide_payload`]). They take a
//!   [`Who`] (a capture has no user: [`Who::ip`]) and fold verdicts into
//!   [`Findings`] the way `proxy::explicit::apply` folds them, so
//!   `proxy::tunnel` can call them instead of keeping its own copy.
//!
//! It leaves sockets, timers, metrics and access logs to `proxy`: time is
//! replaced by what the capture shows (the order of the packets, and whether
//! the client ended its side).
//!
//! Assumptions and limits, where they bite:
//! - flows are decided as the transparent listeners would see them: the
//!   destination is the packet's address, ports 80 and 443 connect upstream
//!   only once the client has spoken (so a server that speaks first there is
//!   never heard), other ports connect at once;
//! - IP fragments are skipped, and so are flows without a SYN that carry no
//!   payload (stray packets at the start of a capture);
//! - a flow whose start is not in the capture, or with bytes missing before
//!   the inspection window is full, is decided on what is there and marked
//!   `partial`;
//! - explicit-proxy traffic (CONNECT to the proxy port) is seen as HTTP to
//!   the proxy's address; the tunnel inside a CONNECT is not replayed.
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::Path;

use etherparse::{EtherType, LaxNetSlice, LaxSlicedPacket, TransportSlice};
use pcap_file::pcap::PcapReader;
use pcap_file::pcapng::{Block, PcapNgReader};
use pcap_file::{DataLink, PcapError};

use crate::classify::payload::Direction;
use crate::classify::server_hello::{inspect_server_flight, ServerFlight};
use crate::classify::{Detection, Reason, UNIDENTIFIED};
use crate::decide::{self, Cue, Findings, First, FirstBytes, Refusal, ReqCue, Requests, Step};
use crate::engine::Engine;
use crate::policy::{Verdict, Who};

/// The first four bytes of a pcapng file (Section Header Block type).
const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];
/// Linux cooked capture v1 header length (the protocol is at 14..16).
const SLL_HEADER: usize = 16;
/// Linux cooked capture v2 header length (the protocol is at 0..2).
const SLL2_HEADER: usize = 20;
/// The warning for a capture cut off inside a packet.
const CUT: &str = "the capture ends inside a packet (cut off?); replayed up to there";
/// BSD loopback header: a 4-byte address family.
const NULL_HEADER: usize = 4;

// ---------------------------------------------------------------------------
// Reading captures.
// ---------------------------------------------------------------------------

/// A capture that cannot be read.
#[derive(Debug)]
pub enum ReplayError {
    Io(std::io::Error),
    /// Not a pcap or pcapng file, or a broken one.
    Format(String),
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplayError::Io(e) => write!(f, "cannot read the capture: {e}"),
            ReplayError::Format(m) => write!(f, "not a readable pcap or pcapng capture: {m}"),
        }
    }
}

impl std::error::Error for ReplayError {}

/// One TCP segment as the reassembly needs it.
struct Segment<'a> {
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    syn: bool,
    ack: bool,
    fin: bool,
    rst: bool,
    payload: &'a [u8],
}

/// Decode one frame down to TCP; `None` for anything else (other link
/// types or protocols, IP fragments, broken headers).
fn decode(link: DataLink, frame: &[u8]) -> Option<Segment<'_>> {
    let sliced = match link {
        DataLink::ETHERNET => LaxSlicedPacket::from_ethernet(frame).ok()?,
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => LaxSlicedPacket::from_ip(frame).ok()?,
        DataLink::NULL | DataLink::LOOP => {
            LaxSlicedPacket::from_ip(frame.get(NULL_HEADER..)?).ok()?
        }
        DataLink::LINUX_SLL => {
            let proto = u16::from_be_bytes([*frame.get(14)?, *frame.get(15)?]);
            LaxSlicedPacket::from_ether_type(EtherType(proto), frame.get(SLL_HEADER..)?)
        }
        DataLink::LINUX_SLL2 => {
            let proto = u16::from_be_bytes([*frame.first()?, *frame.get(1)?]);
            LaxSlicedPacket::from_ether_type(EtherType(proto), frame.get(SLL2_HEADER..)?)
        }
        _ => return None,
    };
    let (src, dst): (IpAddr, IpAddr) = match sliced.net.as_ref()? {
        LaxNetSlice::Ipv4(v4) => (
            v4.header().source_addr().into(),
            v4.header().destination_addr().into(),
        ),
        LaxNetSlice::Ipv6(v6) => (
            v6.header().source_addr().into(),
            v6.header().destination_addr().into(),
        ),
    };
    let TransportSlice::Tcp(tcp) = sliced.transport.as_ref()? else {
        return None;
    };
    Some(Segment {
        src: SocketAddr::new(src, tcp.source_port()),
        dst: SocketAddr::new(dst, tcp.destination_port()),
        seq: tcp.sequence_number(),
        syn: tcp.syn(),
        ack: tcp.ack(),
        fin: tcp.fin(),
        rst: tcp.rst(),
        payload: tcp.payload(),
    })
}

/// Call `f` with the link type and bytes of every frame of a pcap or
/// pcapng capture. A capture cut off inside its last packet is read up to
/// there, with a warning.
fn for_each_frame<R: Read>(
    reader: R,
    warnings: &mut Vec<String>,
    mut f: impl FnMut(DataLink, &[u8]),
) -> Result<(), ReplayError> {
    let mut reader = BufReader::new(reader);
    let head = reader.fill_buf().map_err(ReplayError::Io)?;
    if head.is_empty() {
        return Err(ReplayError::Format("the file is empty".into()));
    }
    let truncated = |e: &PcapError| matches!(e, PcapError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof);
    let format_error = |e: PcapError| match e {
        PcapError::IoError(io) => ReplayError::Io(io),
        other => ReplayError::Format(other.to_string()),
    };
    if head.starts_with(&PCAPNG_MAGIC) {
        let mut ng = PcapNgReader::new(reader).map_err(format_error)?;
        // Link types of the current section's interfaces, by interface id.
        let mut links: Vec<DataLink> = ng.interfaces().iter().map(|i| i.linktype).collect();
        while let Some(block) = ng.next_block() {
            let block = match block {
                Ok(b) => b,
                Err(e) if truncated(&e) => {
                    warnings.push(CUT.into());
                    break;
                }
                Err(e) => return Err(format_error(e)),
            };
            match block {
                Block::SectionHeader(_) => links.clear(),
                Block::InterfaceDescription(idb) => links.push(idb.linktype),
                Block::EnhancedPacket(epb) => match links.get(epb.interface_id as usize) {
                    Some(&link) => f(link, &epb.data),
                    None => {
                        return Err(ReplayError::Format(format!(
                            "packet on undeclared interface {}",
                            epb.interface_id
                        )))
                    }
                },
                Block::SimplePacket(spb) => match links.first() {
                    Some(&link) => f(link, &spb.data),
                    None => return Err(ReplayError::Format("packet before any interface".into())),
                },
                Block::Packet(pb) => match links.get(usize::from(pb.interface_id)) {
                    Some(&link) => f(link, &pb.data),
                    None => {
                        return Err(ReplayError::Format(format!(
                            "packet on undeclared interface {}",
                            pb.interface_id
                        )))
                    }
                },
                _ => {}
            }
        }
    } else {
        let mut pcap = PcapReader::new(reader).map_err(format_error)?;
        let link = pcap.header().datalink;
        while let Some(packet) = pcap.next_packet() {
            match packet {
                Ok(p) => f(link, &p.data),
                Err(e) if truncated(&e) => {
                    warnings.push(CUT.into());
                    break;
                }
                Err(e) => return Err(format_error(e)),
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// TCP reassembly.
// ---------------------------------------------------------------------------

/// One direction of a TCP connection, from its first byte up to a cap.
#[derive(Debug, Default)]
struct HalfStream {
    /// Sequence number of stream byte 0: the SYN's plus one, or the first
    /// segment's when the SYN is not in the capture.
    base: Option<u32>,
    /// No SYN was seen before the first byte: byte 0 may not be the start.
    midstream: bool,
    /// Bytes at stream offsets `0..data.len()`; holes are zero.
    data: Vec<u8>,
    /// The filled ranges of `data`: sorted, disjoint, not touching.
    filled: Vec<Range<usize>>,
    /// Lengths of the contiguous start after each segment that grew it:
    /// where the proxy's reads could have ended.
    reads: Vec<usize>,
    /// Packet number of the first payload byte.
    first_data: Option<u64>,
    /// A FIN or RST came from this side.
    ended: bool,
}

impl HalfStream {
    fn syn(&mut self, seq: u32) {
        if self.base.is_none() {
            self.base = Some(seq.wrapping_add(1));
        }
    }

    /// Add a segment's payload; bytes already present keep their first value
    /// (a retransmission carries the same bytes, an overlap that differs is
    /// not what the receiver took).
    fn segment(&mut self, seq: u32, payload: &[u8], cap: usize, packet: u64) {
        if payload.is_empty() {
            return;
        }
        self.first_data.get_or_insert(packet);
        let base = match self.base {
            Some(b) => b,
            None => {
                self.midstream = true;
                *self.base.insert(seq)
            }
        };
        // Sequence space wraps (RFC 9293 §3.4): the signed distance says
        // whether the segment starts before byte 0 (an old retransmission).
        let rel = i64::from(seq.wrapping_sub(base) as i32);
        let (start, payload) = if rel < 0 {
            let skip = usize::try_from(-rel).unwrap_or(usize::MAX);
            match payload.get(skip..) {
                Some(p) if !p.is_empty() => (0, p),
                _ => return,
            }
        } else {
            (usize::try_from(rel).unwrap_or(usize::MAX), payload)
        };
        if start >= cap {
            return;
        }
        let end = start.saturating_add(payload.len()).min(cap);
        self.fill(start..end, &payload[..end - start]);
        let contiguous = self.contiguous();
        if contiguous > 0 && self.reads.last() != Some(&contiguous) {
            self.reads.push(contiguous);
        }
    }

    fn fill(&mut self, range: Range<usize>, bytes: &[u8]) {
        debug_assert_eq!(range.len(), bytes.len());
        if self.data.len() < range.end {
            self.data.resize(range.end, 0);
        }
        let mut cursor = range.start;
        let copy = |from: usize, to: usize, data: &mut Vec<u8>| {
            data[from..to].copy_from_slice(&bytes[from - range.start..to - range.start]);
        };
        for r in &self.filled {
            if r.end <= cursor {
                continue;
            }
            if r.start >= range.end {
                break;
            }
            if r.start > cursor {
                copy(cursor, r.start, &mut self.data);
            }
            cursor = r.end;
            if cursor >= range.end {
                break;
            }
        }
        if cursor < range.end {
            copy(cursor, range.end, &mut self.data);
        }
        self.filled.push(range);
        self.filled.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<usize>> = Vec::with_capacity(self.filled.len());
        for r in self.filled.drain(..) {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        self.filled = merged;
    }

    /// Length of the gapless start of the stream.
    fn contiguous(&self) -> usize {
        match self.filled.first() {
            Some(r) if r.start == 0 => r.end,
            _ => 0,
        }
    }

    /// Bytes are missing after the gapless start.
    fn has_gap(&self) -> bool {
        self.filled.len() > 1 || self.filled.first().is_some_and(|r| r.start > 0)
    }
}

/// A reassembled TCP flow: the start of each direction.
#[derive(Debug, Clone)]
pub struct TcpFlow {
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// The client's first bytes, gapless, at most the inspection window.
    pub client_bytes: Vec<u8>,
    /// Lengths of `client_bytes` after each segment that grew it.
    pub client_reads: Vec<usize>,
    /// The server's first bytes, gapless.
    pub server_bytes: Vec<u8>,
    /// The client sent FIN or RST.
    pub client_ended: bool,
    /// The server's first byte came before the client's.
    pub upstream_first: bool,
    /// Some payload went either way.
    pub any_payload: bool,
    /// The flow's start is not in the capture, or client bytes are missing.
    pub partial: bool,
}

/// A connection being reassembled.
struct Conn {
    /// Order of the flow's first packet in the capture.
    order: usize,
    client: SocketAddr,
    server: SocketAddr,
    client_isn: Option<u32>,
    up: HalfStream,
    down: HalfStream,
    rst: bool,
}

impl Conn {
    fn closed(&self) -> bool {
        self.rst || (self.up.ended && self.down.ended)
    }

    fn into_flow(self) -> TcpFlow {
        let first_up = self.up.first_data;
        let first_down = self.down.first_data;
        let upstream_first = match (first_down, first_up) {
            (Some(d), Some(u)) => d < u,
            (Some(_), None) => true,
            _ => false,
        };
        let up_len = self.up.contiguous();
        let down_len = self.down.contiguous();
        TcpFlow {
            client: self.client,
            server: self.server,
            any_payload: first_up.is_some() || first_down.is_some(),
            partial: self.up.midstream || self.up.has_gap(),
            client_reads: self.up.reads,
            client_bytes: {
                let mut d = self.up.data;
                d.truncate(up_len);
                d
            },
            server_bytes: {
                let mut d = self.down.data;
                d.truncate(down_len);
                d
            },
            client_ended: self.up.ended,
            upstream_first,
        }
    }
}

/// Flows keyed by their endpoints, in either order.
type Key = (SocketAddr, SocketAddr);

fn key(a: SocketAddr, b: SocketAddr) -> Key {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// TCP reassembly over a sequence of segments; flows come out as they
/// close (or at the end), tagged with the order of their first packet.
struct Reassembly {
    up_cap: usize,
    down_cap: usize,
    open: HashMap<Key, Conn>,
    /// Keys of flows that ended: late ACKs and retransmissions are ignored.
    closed: HashSet<Key>,
    next_order: usize,
    packets: u64,
}

impl Reassembly {
    fn new(up_cap: usize, down_cap: usize) -> Reassembly {
        Reassembly {
            up_cap,
            down_cap,
            open: HashMap::new(),
            closed: HashSet::new(),
            next_order: 0,
            packets: 0,
        }
    }

    fn push(&mut self, s: &Segment<'_>, done: &mut impl FnMut(usize, TcpFlow)) {
        self.packets += 1;
        let k = key(s.src, s.dst);
        let opening = s.syn && !s.ack;
        if let Some(conn) = self.open.get(&k) {
            // A new SYN on an open 4-tuple with another ISN: the port was
            // reused and the old flow's end is missing.
            if opening && s.src == conn.client && conn.client_isn.is_some_and(|isn| isn != s.seq) {
                if let Some(old) = self.open.remove(&k) {
                    done(old.order, old.into_flow());
                }
            }
        } else if self.closed.contains(&k) {
            if !opening {
                return;
            }
            self.closed.remove(&k);
        }
        if !self.open.contains_key(&k) {
            if !s.syn && s.payload.is_empty() {
                // A stray packet of a flow whose start is not in the capture.
                return;
            }
            // The SYN's sender is the client, the SYN-ACK's receiver too;
            // without either, the first sender.
            let (client, server) = if s.syn && s.ack {
                (s.dst, s.src)
            } else {
                (s.src, s.dst)
            };
            let order = self.next_order;
            self.next_order += 1;
            self.open.insert(
                k,
                Conn {
                    order,
                    client,
                    server,
                    client_isn: None,
                    up: HalfStream::default(),
                    down: HalfStream::default(),
                    rst: false,
                },
            );
        }
        let Some(conn) = self.open.get_mut(&k) else {
            return;
        };
        let from_client = s.src == conn.client;
        let (half, cap) = if from_client {
            (&mut conn.up, self.up_cap)
        } else {
            (&mut conn.down, self.down_cap)
        };
        if s.syn {
            half.syn(s.seq);
            if from_client && !s.ack {
                conn.client_isn.get_or_insert(s.seq);
            }
        }
        // A SYN's payload (TCP Fast Open) starts after the SYN's number.
        let seq = if s.syn { s.seq.wrapping_add(1) } else { s.seq };
        half.segment(seq, s.payload, cap, self.packets);
        if s.fin || s.rst {
            half.ended = true;
        }
        conn.rst |= s.rst;
        if conn.closed() {
            if let Some(c) = self.open.remove(&k) {
                self.closed.insert(k);
                done(c.order, c.into_flow());
            }
        }
    }

    fn finish(self, done: &mut impl FnMut(usize, TcpFlow)) {
        let mut rest: Vec<Conn> = self.open.into_values().collect();
        rest.sort_by_key(|c| c.order);
        for c in rest {
            done(c.order, c.into_flow());
        }
    }
}

// ---------------------------------------------------------------------------
// Replay: flows → reports.
// ---------------------------------------------------------------------------

/// The verdict on one flow, with what explains it.
#[derive(Debug, Clone)]
pub struct FlowReport {
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// A denied destination is a block with no rule and the note
    /// `destination`.
    pub verdict: Verdict,
    /// For an allowed flow: a detection the policy let pass.
    pub allowed: Option<Detection>,
    /// A decision that is not a signature's: `destination` (denied range),
    /// `allowlist`, `no payload`, `client closed before sending`.
    pub note: Option<&'static str>,
    pub sni: Option<String>,
    pub alpn: Option<String>,
    pub ja4: Option<String>,
    pub host: Option<String>,
    pub partial: bool,
}

/// Decide one reassembled flow as the proxy would.
pub fn decide_flow(engine: &Engine, flow: &TcpFlow) -> FlowReport {
    let mut report = FlowReport {
        client: flow.client,
        server: flow.server,
        verdict: Verdict::Allow,
        allowed: None,
        note: None,
        sni: None,
        alpn: None,
        ja4: None,
        host: None,
        partial: flow.partial,
    };
    let mut findings = Findings::default();
    let result = replay_flow(engine, flow, &mut findings, &mut report);
    report.verdict = match result {
        Ok(()) => findings.verdict(),
        Err(Refusal::Blocked(d)) => Verdict::Block(d),
        Err(Refusal::DeniedDestination(_)) => {
            report.note = Some("destination");
            // Not a signature's verdict: block, no app.
            Verdict::Block(Detection {
                app: UNIDENTIFIED,
                rule: None,
                reason: Reason::Ip,
                offset: None,
                exception: None,
            })
        }
        Err(Refusal::ClosedBeforeSending) => {
            report.note.get_or_insert("client closed before sending");
            findings.verdict()
        }
        Err(Refusal::Malformed(why)) => {
            // A 400 from the proxy: nothing of the request went on.
            report.note = Some(why);
            Verdict::Block(Detection {
                app: UNIDENTIFIED,
                rule: None,
                reason: Reason::Http,
                offset: None,
                exception: None,
            })
        }
        Err(Refusal::Loop) => {
            report.note = Some("loop");
            findings.verdict()
        }
    };
    if report.verdict == Verdict::Allow {
        report.allowed = findings.allowed;
    }
    report
}

fn replay_flow(
    engine: &Engine,
    flow: &TcpFlow,
    findings: &mut Findings,
    report: &mut FlowReport,
) -> Result<(), Refusal> {
    let who = &Who::ip(flow.client.ip());
    let port = flow.server.port();
    let allowlisted = decide::destination(engine, who, flow.server, false, findings)?;
    if allowlisted {
        report.note = Some("allowlist");
    }
    if !flow.any_payload {
        report.note.get_or_insert("no payload");
        return Ok(());
    }
    let mut check = FirstBytes::new(engine, who.clone(), port, allowlisted, true);
    let result = first_bytes(&mut check, flow, findings);
    if let Some(h) = check.hello.take() {
        report.sni = h.sni.clone();
        report.alpn = (!h.alpn.is_empty()).then(|| h.alpn.join(","));
        report.ja4 = Some(h.ja4.clone());
    }
    match result? {
        // No SNI: the certificate a TLS 1.2 server sent in clear decides.
        First::Tls if report.sni.is_none() && !allowlisted => {
            match inspect_server_flight(&flow.server_bytes) {
                ServerFlight::Names(names) => {
                    decide::server_certificate(engine, who, &names, findings)
                }
                _ => Ok(()),
            }
        }
        First::Tls => Ok(()),
        First::Http => requests(engine, who, flow, allowlisted, report, findings),
        // An allow-listed destination is never refused on its payload.
        First::Payload if allowlisted => Ok(()),
        First::Payload => decide::payload(
            engine,
            who,
            &flow.client_bytes,
            &flow.server_bytes,
            findings,
        ),
    }
}

/// Feed the client's bytes read by read, then say how the wait ended.
fn first_bytes(
    check: &mut FirstBytes<'_>,
    flow: &TcpFlow,
    findings: &mut Findings,
) -> Result<First, Refusal> {
    // Ports 80 and 443 connect upstream once the client has spoken: a server
    // that speaks first there is never heard, and the client waits.
    let lazy = matches!(flow.server.port(), 80 | 443);
    if flow.upstream_first {
        let cue = if lazy {
            Cue::Deadline
        } else {
            Cue::UpstreamFirst
        };
        if let Some(first) = check.step(&[], cue, findings)? {
            return Ok(first);
        }
    }
    for &n in &flow.client_reads {
        if let Some(first) = check.step(&flow.client_bytes[..n], Cue::Bytes, findings)? {
            return Ok(first);
        }
    }
    let end = if flow.client_ended && !flow.partial {
        Cue::ClientEnded
    } else {
        Cue::Deadline
    };
    match check.step(&flow.client_bytes, end, findings)? {
        Some(first) => Ok(first),
        // Every cue but `Bytes` answers; keep the proxy's fallback anyway.
        None => Ok(First::Payload),
    }
}

/// A flow that turned out to be HTTP: every request decided on its own, as
/// the proxy follows them ([`decide::Requests`]). What the capture shows
/// of the client's side is all there is: a request cut off by the end of
/// the capture is decided on what is there.
fn requests(
    engine: &Engine,
    who: &Who,
    flow: &TcpFlow,
    allowlisted: bool,
    report: &mut FlowReport,
    findings: &mut Findings,
) -> Result<(), Refusal> {
    let mut reqs = Requests::new(engine, who.clone(), flow.server, None, false);
    let mut rest: &[u8] = &flow.client_bytes;
    // Once every byte is in, how the wait ended.
    let end = if flow.client_ended && !flow.partial {
        ReqCue::Ended
    } else {
        ReqCue::Deadline
    };
    let mut cue = ReqCue::Bytes;
    // Each step forwards at least one byte, answers, or changes the cue.
    for _ in 0..rest.len() * 2 + 4 {
        match reqs.step(rest, cue, findings) {
            Step::NeedMore if reqs.awaiting_switch() => {
                // Whether the server switched: a 101 (or a 2xx to CONNECT)
                // among its bytes. The capture's order of the two
                // directions is not replayed, so this is a close reading.
                reqs.switched(Some(switch_seen(&flow.server_bytes)))
            }
            Step::NeedMore if cue == ReqCue::Bytes => cue = end,
            Step::NeedMore => return Ok(()),
            Step::Forward { len, request } => {
                if let Some(r) = request {
                    report.host.get_or_insert(r.host);
                }
                rest = &rest[len..];
                cue = ReqCue::Bytes;
            }
            Step::Refuse { refusal, request } | Step::Reset { refusal, request } => {
                report.host.get_or_insert(request.host);
                return Err(refusal);
            }
            step @ (Step::Opaque | Step::Lost(_)) => {
                if matches!(step, Step::Lost(_)) {
                    // Not followable as HTTP: the generic rules first.
                    let port = flow.server.port();
                    decide::generic_for_port(engine, who, port, allowlisted, rest, findings)?;
                }
                if allowlisted {
                    return Ok(());
                }
                // What follows: payload signatures.
                let found = decide::payload_detection(engine, Direction::Client, rest);
                return findings.decide(engine, who, found);
            }
        }
    }
    Ok(())
}

/// Does the server's side show a protocol switch: a `101` status line, or
/// `200` to a CONNECT, at the start of a line?
fn switch_seen(server: &[u8]) -> bool {
    server.split(|&b| b == b'\n').any(|line| {
        line.starts_with(b"HTTP/1.1 101")
            || line.starts_with(b"HTTP/1.0 101")
            || line.starts_with(b"HTTP/1.1 200 Connection established")
    })
}

/// The outcome of replaying a capture.
#[derive(Debug, Default)]
pub struct Replay {
    /// One report per TCP flow, in the order of the flows' first packets.
    pub flows: Vec<FlowReport>,
    /// TCP segments read.
    pub packets: u64,
    /// Frames that were not TCP over IP (or could not be decoded).
    pub skipped: u64,
    pub warnings: Vec<String>,
}

/// Replay every TCP flow of a pcap or pcapng stream.
pub fn replay<R: Read>(engine: &Engine, reader: R) -> Result<Replay, ReplayError> {
    let window = engine.config.inspect_bytes;
    let server_cap = engine
        .signatures
        .payload()
        .reach(Direction::Server)
        .min(window);
    let mut reassembly = Reassembly::new(window, server_cap);
    let mut out = Replay::default();
    let mut reports: Vec<(usize, FlowReport)> = Vec::new();
    let mut done = |order: usize, flow: TcpFlow| reports.push((order, decide_flow(engine, &flow)));
    let mut skipped = 0u64;
    for_each_frame(reader, &mut out.warnings, |link, frame| {
        match decode(link, frame) {
            Some(seg) => reassembly.push(&seg, &mut done),
            None => skipped += 1,
        }
    })?;
    out.packets = reassembly.packets;
    reassembly.finish(&mut done);
    reports.sort_by_key(|(order, _)| *order);
    out.flows = reports.into_iter().map(|(_, r)| r).collect();
    out.skipped = skipped;
    Ok(out)
}

/// Replay a capture file.
pub fn replay_file(engine: &Engine, path: &Path) -> Result<Replay, ReplayError> {
    let file = std::fs::File::open(path).map_err(ReplayError::Io)?;
    replay(engine, file)
}

// ---------------------------------------------------------------------------
// Output.
// ---------------------------------------------------------------------------

impl FlowReport {
    /// The detection that explains the verdict, if any.
    pub fn detection(&self) -> Option<&Detection> {
        self.verdict.detection().or(self.allowed.as_ref())
    }

    fn app<'e>(&self, engine: &'e Engine) -> Option<&'e str> {
        let d = self.detection()?;
        (d.app != UNIDENTIFIED).then(|| engine.signatures.app_id(d.app))
    }

    fn reason(&self) -> Option<&'static str> {
        match self.note {
            Some("destination") => Some("destination"),
            _ => self.detection().map(|d| d.reason.as_str()),
        }
    }

    /// The rule's text and its `file:line`.
    fn rule(&self, engine: &Engine) -> (Option<String>, Option<String>) {
        let set = &engine.signatures;
        let Some(rule) = self
            .detection()
            .and_then(|d| d.rule)
            .and_then(|r| set.rule(r))
        else {
            return (None, None);
        };
        let at = set
            .app(rule.app)
            .map(|a| format!("{}:{}", a.file, rule.line));
        (Some(rule.text.clone()), at)
    }

    /// `client -> server verdict app reason evidence`.
    pub fn to_line(&self, engine: &Engine) -> String {
        let (rule, at) = self.rule(engine);
        let mut evidence = Vec::new();
        if let Some(r) = rule {
            evidence.push(format!("rule={r:?}"));
        }
        if let Some(at) = at {
            evidence.push(format!("at={at}"));
        }
        if let Some(o) = self.detection().and_then(|d| d.offset) {
            evidence.push(format!("offset={o}"));
        }
        for (k, v) in [
            ("sni", &self.sni),
            ("host", &self.host),
            ("alpn", &self.alpn),
        ] {
            if let Some(v) = v {
                evidence.push(format!("{k}={v}"));
            }
        }
        if let Some(n) = self.note.filter(|n| *n != "destination") {
            evidence.push(format!("note={n:?}"));
        }
        if self.partial {
            evidence.push("partial".into());
        }
        format!(
            "{} -> {} {} {} {} {}",
            self.client,
            self.server,
            self.verdict.as_str(),
            self.app(engine).unwrap_or("-"),
            self.reason().unwrap_or("-"),
            if evidence.is_empty() {
                "-".to_string()
            } else {
                evidence.join(" ")
            }
        )
    }

    pub fn to_json(&self, engine: &Engine) -> serde_json::Value {
        let (rule, at) = self.rule(engine);
        serde_json::json!({
            "client": self.client.to_string(),
            "server": self.server.to_string(),
            "verdict": self.verdict.as_str(),
            "app": self.app(engine),
            "reason": self.reason(),
            "rule": rule,
            "rule_at": at,
            "offset": self.detection().and_then(|d| d.offset),
            "sni": self.sni,
            "host": self.host,
            "ja4": self.ja4,
            "alpn": self.alpn,
            "note": self.note,
            "partial": self.partial,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use etherparse::PacketBuilder;
    use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
    use std::time::Duration;

    fn engine(config: &str) -> Engine {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chatwall.toml");
        std::fs::write(&path, config).expect("write config");
        Engine::build(Config::load(Some(&path)).expect("config")).expect("engine")
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    /// Builds the packets of TCP connections, tracking sequence numbers.
    struct Tcp {
        client: SocketAddr,
        server: SocketAddr,
        cseq: u32,
        sseq: u32,
    }

    impl Tcp {
        fn new(client: &str, server: &str) -> Tcp {
            Tcp {
                client: sa(client),
                server: sa(server),
                cseq: 1000,
                sseq: 0xffff_fff0, // wraps during the flow
            }
        }

        fn frame(
            from: SocketAddr,
            to: SocketAddr,
            seq: u32,
            ack: u32,
            flags: &str,
            payload: &[u8],
        ) -> Vec<u8> {
            let base = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
            let (sport, dport) = (from.port(), to.port());
            let mut t = match (from.ip(), to.ip()) {
                (IpAddr::V4(a), IpAddr::V4(b)) => base
                    .ipv4(a.octets(), b.octets(), 64)
                    .tcp(sport, dport, seq, 64240),
                (IpAddr::V6(a), IpAddr::V6(b)) => base
                    .ipv6(a.octets(), b.octets(), 64)
                    .tcp(sport, dport, seq, 64240),
                _ => panic!("mixed families"),
            };
            if flags.contains('S') {
                t = t.syn();
            }
            if flags.contains('A') {
                t = t.ack(ack);
            }
            if flags.contains('F') {
                t = t.fin();
            }
            if flags.contains('R') {
                t = t.rst();
            }
            if flags.contains('P') {
                t = t.psh();
            }
            let mut out = Vec::with_capacity(t.size(payload.len()));
            t.write(&mut out, payload).expect("build packet");
            out
        }

        fn handshake(&mut self) -> Vec<Vec<u8>> {
            let v = vec![
                Self::frame(self.client, self.server, self.cseq, 0, "S", b""),
                Self::frame(
                    self.server,
                    self.client,
                    self.sseq,
                    self.cseq + 1,
                    "SA",
                    b"",
                ),
                Self::frame(
                    self.client,
                    self.server,
                    self.cseq + 1,
                    self.sseq.wrapping_add(1),
                    "A",
                    b"",
                ),
            ];
            self.cseq = self.cseq.wrapping_add(1);
            self.sseq = self.sseq.wrapping_add(1);
            v
        }

        fn up(&mut self, data: &[u8]) -> Vec<u8> {
            let f = Self::frame(self.client, self.server, self.cseq, self.sseq, "PA", data);
            self.cseq = self.cseq.wrapping_add(data.len() as u32);
            f
        }

        fn down(&mut self, data: &[u8]) -> Vec<u8> {
            let f = Self::frame(self.server, self.client, self.sseq, self.cseq, "PA", data);
            self.sseq = self.sseq.wrapping_add(data.len() as u32);
            f
        }

        fn close(&mut self) -> Vec<Vec<u8>> {
            vec![
                Self::frame(self.client, self.server, self.cseq, self.sseq, "FA", b""),
                Self::frame(
                    self.server,
                    self.client,
                    self.sseq,
                    self.cseq + 1,
                    "FA",
                    b"",
                ),
            ]
        }
    }

    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut w = PcapWriter::with_header(
            Vec::new(),
            PcapHeader {
                datalink: DataLink::ETHERNET,
                endianness: pcap_file::Endianness::Little,
                ..PcapHeader::default()
            },
        )
        .expect("pcap writer");
        for (i, f) in frames.iter().enumerate() {
            let p = PcapPacket::new(Duration::from_millis(i as u64), f.len() as u32, f);
            w.write_packet(&p).expect("write packet");
        }
        w.into_writer()
    }

    /// A TLS 1.3 ClientHello with SNI `name` and ALPN h2 (RFC 8446 §4.1.2).
    fn client_hello(name: &str) -> Vec<u8> {
        client_hello_padded(name, 0)
    }

    /// The same, with a padding extension of `pad` bytes (RFC 7685).
    fn client_hello_padded(name: &str, pad: usize) -> Vec<u8> {
        let mut ext = Vec::new();
        let n = name.as_bytes();
        // server_name (RFC 6066 §3)
        ext.extend_from_slice(&[0x00, 0x00]);
        ext.extend_from_slice(&((n.len() + 5) as u16).to_be_bytes());
        ext.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes());
        ext.push(0);
        ext.extend_from_slice(&(n.len() as u16).to_be_bytes());
        ext.extend_from_slice(n);
        // supported_versions: TLS 1.3
        ext.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        // ALPN: h2
        ext.extend_from_slice(&[0x00, 0x10, 0x00, 0x05, 0x00, 0x03, 0x02, b'h', b'2']);
        if pad > 0 {
            ext.extend_from_slice(&[0x00, 0x15]);
            ext.extend_from_slice(&(pad as u16).to_be_bytes());
            ext.resize(ext.len() + pad, 0);
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]); // random
        body.push(0); // legacy_session_id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // cipher_suites
        body.extend_from_slice(&[0x01, 0x00]); // compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![0x01];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    fn run(engine: &Engine, frames: &[Vec<u8>]) -> Replay {
        replay(engine, &pcap(frames)[..]).expect("replay")
    }

    fn summary(engine: &Engine, r: &FlowReport) -> (String, String, String) {
        (
            r.verdict.as_str().to_string(),
            r.app(engine).unwrap_or("-").to_string(),
            r.reason().unwrap_or("-").to_string(),
        )
    }

    fn s(v: (&str, &str, &str)) -> (String, String, String) {
        (v.0.into(), v.1.into(), v.2.into())
    }

    #[test]
    fn tls_hello_split_over_two_segments_is_reassembled() {
        let e = engine("");
        let hello = client_hello("web.whatsapp.com");
        let mut t = Tcp::new("10.0.0.2:50000", "157.240.1.53:443");
        let mut frames = t.handshake();
        let (a, b) = hello.split_at(40);
        // The second half arrives first, and the first half is retransmitted.
        let first = t.up(a);
        let second = t.up(b);
        frames.extend([second, first.clone(), first]);
        frames.extend(t.close());
        let r = run(&e, &frames);
        assert_eq!(r.flows.len(), 1);
        let f = &r.flows[0];
        assert_eq!(summary(&e, f), s(("block", "whatsapp", "sni")));
        assert_eq!(f.sni.as_deref(), Some("web.whatsapp.com"));
        assert!(
            f.ja4.as_deref().is_some_and(|j| j.starts_with("t13d")),
            "{:?}",
            f.ja4
        );
        assert!(!f.partial);
        let line = f.to_line(&e);
        assert!(line.starts_with("10.0.0.2:50000 -> 157.240.1.53:443 block whatsapp sni rule=\"*.whatsapp.com\" at=signatures/whatsapp.toml:"), "{line}");
    }

    #[test]
    fn verdicts_per_flow() {
        let e = engine("");
        let mut frames = Vec::new();
        // XMPP on 5222: the port names it before any byte.
        let mut x = Tcp::new("10.0.0.2:50001", "198.51.100.7:5222");
        frames.extend(x.handshake());
        frames.push(x.up(b"<?xml version='1.0'?><stream:stream to='example.com' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"));
        frames.extend(x.close());
        // XMPP on a port no rule names: the payload signature does.
        let mut x2 = Tcp::new("10.0.0.2:50002", "198.51.100.7:8010");
        frames.extend(x2.handshake());
        frames.push(x2.up(b"<stream:stream to='example.com' xmlns='jabber:client'>"));
        frames.extend(x2.close());
        // Plain HTTP to example.com: allowed.
        let mut h = Tcp::new("10.0.0.2:50003", "93.184.215.14:80");
        frames.extend(h.handshake());
        frames.push(h.up(b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8\r\n\r\n"));
        frames.push(h.down(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        frames.extend(h.close());
        // WhatsApp's prologue to a Telegram address on 443: the address decides first.
        let mut w = Tcp::new("10.0.0.2:50004", "149.154.167.51:443");
        frames.extend(w.handshake());
        frames.push(w.up(&[0x57, 0x41, 0x06, 0x03, 0x00, 0x00, 0x24]));
        frames.extend(w.close());
        // The same prologue to an address no rule names: the payload decides.
        let mut w2 = Tcp::new("10.0.0.2:50005", "203.0.113.9:443");
        frames.extend(w2.handshake());
        frames.push(w2.up(&[0x57, 0x41, 0x06, 0x03, 0x00, 0x00, 0x24]));
        frames.extend(w2.close());
        // SSH on 443: not TLS.
        let mut ssh = Tcp::new("10.0.0.2:50006", "203.0.113.10:443");
        frames.extend(ssh.handshake());
        frames.push(ssh.up(b"SSH-2.0-OpenSSH_9.6\r\n"));
        frames.extend(ssh.close());

        let r = run(&e, &frames);
        let got: Vec<_> = r.flows.iter().map(|f| summary(&e, f)).collect();
        assert_eq!(
            got,
            vec![
                s(("block", "xmpp", "port")),
                s(("block", "xmpp", "payload")),
                s(("allow", "-", "-")),
                s(("block", "telegram", "ip")),
                // Not TLS on 443: the knob refuses, the payload names the app.
                s(("block", "whatsapp", "non_tls")),
                s(("block", "-", "non_tls")),
            ]
        );
        assert_eq!(r.flows[2].host.as_deref(), Some("example.com"));
        assert_eq!(r.flows[4].detection().and_then(|d| d.offset), Some(0));
        let json = r.flows[1].to_json(&e);
        assert_eq!(json["app"], "xmpp");
        assert_eq!(json["reason"], "payload");
        assert!(json["rule_at"]
            .as_str()
            .is_some_and(|a| a.starts_with("signatures/xmpp.toml:")));
        assert!(json["offset"].is_u64());
    }

    #[test]
    fn policy_allow_and_monitor_are_honoured() {
        let e = engine("[policy.apps]\nwhatsapp = \"allow\"\ntelegram = \"monitor\"\n");
        let mut frames = Vec::new();
        let mut a = Tcp::new("10.0.0.2:50010", "157.240.1.53:443");
        frames.extend(a.handshake());
        frames.push(a.up(&client_hello("web.whatsapp.com")));
        let mut b = Tcp::new("10.0.0.2:50011", "149.154.167.51:443");
        frames.extend(b.handshake());
        frames.push(b.up(&client_hello("example.org")));
        let r = run(&e, &frames);
        let got: Vec<_> = r.flows.iter().map(|f| summary(&e, f)).collect();
        assert_eq!(
            got,
            vec![
                s(("allow", "whatsapp", "sni")),
                s(("monitor", "telegram", "ip"))
            ]
        );
    }

    #[test]
    fn http_rules_and_downloads_apply_per_request() {
        let e = engine("");
        let mut frames = Vec::new();
        let mut t = Tcp::new("10.0.0.2:50020", "198.51.100.20:80");
        frames.extend(t.handshake());
        // A harmless request, then an XMPP BOSH body in a second request.
        let body = b"<body rid='1' xmlns='http://jabber.org/protocol/httpbind' to='example.com'/>";
        let mut reqs = b"GET /index.html HTTP/1.1\r\nHost: www.example.net\r\n\r\n".to_vec();
        reqs.extend_from_slice(
            format!(
                "POST /http-bind HTTP/1.1\r\nHost: www.example.net\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        reqs.extend_from_slice(body);
        frames.push(t.up(&reqs));
        let mut d = Tcp::new("10.0.0.2:50021", "198.51.100.21:80");
        frames.extend(d.handshake());
        frames.push(
            d.up(b"GET /download/WhatsAppSetup.exe HTTP/1.1\r\nHost: cdn.example.com\r\n\r\n"),
        );
        let r = run(&e, &frames);
        let got: Vec<_> = r.flows.iter().map(|f| summary(&e, f)).collect();
        assert_eq!(
            got,
            vec![
                s(("block", "xmpp", "http")),
                s(("block", "whatsapp", "download"))
            ]
        );
        assert_eq!(r.flows[0].host.as_deref(), Some("www.example.net"));
    }

    #[test]
    fn chunked_bodies_are_decoded_for_body_rules() {
        let e = engine("");
        let body = b"<body xmlns='http://jabber.org/protocol/httpbind'/>";
        let mut req =
            b"POST /x HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let (a, b) = body.split_at(20);
        for part in [a, b] {
            req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            req.extend_from_slice(part);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        let head_end = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
        let (data, ended) = crate::classify::h1::body_prefix(
            crate::classify::h1::Body::Chunked,
            &req[head_end..],
            1024,
        )
        .expect("chunked framing");
        assert_eq!(data, body);
        assert!(ended);
        let mut t = Tcp::new("10.0.0.2:50030", "198.51.100.30:80");
        let mut frames = t.handshake();
        frames.push(t.up(&req));
        let r = run(&e, &frames);
        assert_eq!(summary(&e, &r.flows[0]), s(("block", "xmpp", "http")));
    }

    #[test]
    fn an_app_stricter_than_the_knob_is_still_refused() {
        let e = engine("[policy]\nnon_tls_on_443 = \"monitor\"\n");
        let mut t = Tcp::new("10.0.0.2:50080", "203.0.113.9:443");
        let mut frames = t.handshake();
        frames.push(t.up(&[0x57, 0x41, 0x06, 0x03, 0x00]));
        let mut ssh = Tcp::new("10.0.0.2:50081", "203.0.113.10:443");
        frames.extend(ssh.handshake());
        frames.push(ssh.up(b"SSH-2.0-OpenSSH_9.6\r\n"));
        let r = run(&e, &frames);
        let got: Vec<_> = r.flows.iter().map(|f| summary(&e, f)).collect();
        assert_eq!(
            got,
            vec![
                s(("block", "whatsapp", "payload")),
                s(("monitor", "-", "non_tls"))
            ]
        );
    }

    /// A ClientHello in one-byte records: `len` bytes become `6 * len`.
    fn tiny_records(hello: &[u8]) -> Vec<u8> {
        hello[5..]
            .iter()
            .flat_map(|&b| [0x16, 0x03, 0x01, 0x00, 0x01, b])
            .collect()
    }

    #[test]
    fn hellos_that_never_complete_are_not_tls_on_any_port() {
        let e = engine("");
        let window = e.config.inspect_bytes;
        let hello = client_hello_padded("example.org", window / 5);
        assert!(hello.len() < window && tiny_records(&hello).len() > window);
        let mut frames = Vec::new();
        // Past the window before the hello completes.
        let mut big = Tcp::new("10.0.0.2:50090", "198.51.100.90:8443");
        frames.extend(big.handshake());
        let tiny = tiny_records(&hello);
        for chunk in tiny.chunks(1400) {
            frames.push(big.up(chunk));
        }
        // A hello cut short, and the capture (the deadline) ends.
        let mut cut = Tcp::new("10.0.0.2:50091", "198.51.100.91:8443");
        frames.extend(cut.handshake());
        frames.push(cut.up(&client_hello("example.org")[..30]));
        // The same hello, whole, in ordinary records: allowed.
        let mut ok = Tcp::new("10.0.0.2:50092", "198.51.100.92:8443");
        frames.extend(ok.handshake());
        for chunk in hello.chunks(1400) {
            frames.push(ok.up(chunk));
        }
        let r = run(&e, &frames);
        let got: Vec<_> = r.flows.iter().map(|f| summary(&e, f)).collect();
        assert_eq!(
            got,
            vec![
                s(("block", "-", "non_tls")),
                s(("block", "-", "non_tls")),
                s(("allow", "-", "-"))
            ]
        );
        assert_eq!(r.flows[2].sni.as_deref(), Some("example.org"));
    }

    #[test]
    fn requests_after_an_upgrade_a_second_host_or_an_h2c_offer() {
        let e = engine("");
        let mut frames = Vec::new();
        let mut up = Tcp::new("10.0.0.2:50100", "198.51.100.100:80");
        frames.extend(up.handshake());
        frames.push(up.up(b"GET /chat HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nGET /download/WhatsAppSetup.exe HTTP/1.1\r\nHost: a.example\r\n\r\n"));
        let mut two = Tcp::new("10.0.0.2:50101", "198.51.100.101:80");
        frames.extend(two.handshake());
        frames.push(two.up(b"GET /download/WhatsAppSetup.exe HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"));
        let mut plain = Tcp::new("10.0.0.2:50102", "198.51.100.102:80");
        frames.extend(plain.handshake());
        frames.push(plain.up(b"GET / HTTP/1.1\r\nHost: a.example\r\nUpgrade: h2c\r\n\r\nGET /download/WhatsAppSetup.exe HTTP/1.1\r\nHost: a.example\r\n\r\n"));
        let r = run(&e, &frames);
        let got: Vec<_> = r.flows.iter().map(|f| summary(&e, f)).collect();
        assert_eq!(
            got,
            vec![
                // An upgrade the server did not take (no 101 in the
                // capture): HTTP goes on, and the next request is decided.
                s(("block", "whatsapp", "download")),
                // Two Host fields: a 400, nothing forwarded.
                s(("block", "-", "http")),
                // An h2c offer would escape per-request inspection; servers
                // differ on which Connection options they need to switch.
                s(("block", "-", "http"))
            ]
        );
    }

    #[test]
    fn server_first_and_silent_clients() {
        let e = engine("");
        let mut frames = Vec::new();
        // An IRC-like server banner on a port no rule names: payload, allowed.
        let mut smtp = Tcp::new("10.0.0.2:50040", "198.51.100.40:25");
        frames.extend(smtp.handshake());
        frames.push(smtp.down(b"220 mail.example.net ESMTP\r\n"));
        frames.push(smtp.up(b"EHLO client\r\n"));
        // A client that connects to 443 and never speaks.
        let mut silent = Tcp::new("10.0.0.2:50041", "198.51.100.41:443");
        frames.extend(silent.handshake());
        frames.push(silent.down(b"hello"));
        // A SYN that is never answered: no payload, destination only.
        let mut syn = Tcp::new("10.0.0.2:50042", "198.51.100.42:443");
        frames.push(syn.handshake().remove(0));
        let r = run(&e, &frames);
        let got: Vec<_> = r.flows.iter().map(|f| summary(&e, f)).collect();
        assert_eq!(
            got,
            vec![
                s(("allow", "-", "-")),
                s(("block", "-", "non_tls")),
                s(("allow", "-", "-"))
            ]
        );
        assert_eq!(r.flows[2].note, Some("no payload"));
    }

    #[test]
    fn denied_destinations_and_allow_list() {
        let e = engine(
            "[[policy.allow]]\nhosts = [\"web.whatsapp.com\"]\ncidrs = [\"149.154.167.0/24\"]\n",
        );
        let mut frames = Vec::new();
        let mut lo = Tcp::new("127.0.0.1:50050", "127.0.0.1:8080");
        frames.extend(lo.handshake());
        frames.push(lo.up(b"GET / HTTP/1.1\r\n\r\n"));
        let mut wa = Tcp::new("10.0.0.2:50051", "157.240.1.53:443");
        frames.extend(wa.handshake());
        frames.push(wa.up(&client_hello("web.whatsapp.com")));
        let mut tg = Tcp::new("10.0.0.2:50052", "149.154.167.51:443");
        frames.extend(tg.handshake());
        frames.push(tg.up(&[0x57, 0x41, 0x06, 0x03]));
        let r = run(&e, &frames);
        let got: Vec<_> = r.flows.iter().map(|f| summary(&e, f)).collect();
        // As in the proxy, a tunnel whose address is on the allow-list is
        // refused neither by `non_tls_on_443` nor by payload signatures.
        assert_eq!(
            got,
            vec![
                s(("block", "-", "destination")),
                s(("allow", "-", "-")),
                s(("allow", "-", "-"))
            ]
        );
        assert_eq!(r.flows[2].note, Some("allowlist"));
    }

    #[test]
    fn ipv6_and_midstream_flows() {
        let e = engine("");
        let mut t = Tcp::new("[2001:db8::2]:50060", "[2001:67c:4e8::a]:443");
        // No handshake in the capture: the first sender is the client.
        let frames = vec![t.up(&client_hello("example.org")), t.down(b"x")];
        let r = run(&e, &frames);
        assert_eq!(r.flows.len(), 1);
        assert_eq!(summary(&e, &r.flows[0]), s(("block", "telegram", "ip")));
        assert!(r.flows[0].partial);
        assert_eq!(r.flows[0].client, sa("[2001:db8::2]:50060"));
    }

    #[test]
    fn pcapng_with_linux_cooked_and_raw_interfaces() {
        use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
        use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionBlock;
        use pcap_file::pcapng::{PcapNgBlock, PcapNgWriter};
        use std::borrow::Cow;

        let e = engine("");
        let mut w = PcapNgWriter::new(Vec::new()).expect("writer");
        for link in [DataLink::RAW, DataLink::LINUX_SLL] {
            let idb = InterfaceDescriptionBlock {
                linktype: link,
                snaplen: 0xffff,
                options: vec![],
            };
            w.write_block(&idb.into_block()).expect("idb");
        }
        let strip = |f: Vec<u8>| f[14..].to_vec(); // Ethernet header off
        let sll = |f: Vec<u8>| {
            let mut out = vec![0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0, 0x08, 0x00];
            out.extend_from_slice(&f[14..]);
            out
        };
        let mut t = Tcp::new("10.0.0.3:40000", "157.240.1.60:443");
        let mut frames: Vec<(u32, Vec<u8>)> =
            t.handshake().into_iter().map(|f| (0, strip(f))).collect();
        frames.push((0, strip(t.up(&client_hello("web.whatsapp.com")))));
        let mut x = Tcp::new("10.0.0.3:40001", "198.51.100.50:5222");
        frames.extend(x.handshake().into_iter().map(|f| (1, sll(f))));
        for (iface, data) in &frames {
            let epb = EnhancedPacketBlock {
                interface_id: *iface,
                timestamp: Duration::from_secs(1),
                original_len: data.len() as u32,
                data: Cow::Borrowed(data),
                options: vec![],
            };
            w.write_block(&epb.into_block()).expect("epb");
        }
        let bytes = w.into_inner();
        let r = replay(&e, &bytes[..]).expect("replay");
        let got: Vec<_> = r.flows.iter().map(|f| summary(&e, f)).collect();
        assert_eq!(
            got,
            vec![
                s(("block", "whatsapp", "sni")),
                s(("block", "xmpp", "port"))
            ]
        );
    }

    #[test]
    fn broken_captures_are_errors_and_cut_ones_warnings() {
        let e = engine("");
        assert!(matches!(replay(&e, &b""[..]), Err(ReplayError::Format(_))));
        assert!(matches!(
            replay(&e, &b"not a capture at all, really"[..]),
            Err(ReplayError::Format(_))
        ));
        let mut t = Tcp::new("10.0.0.2:50070", "203.0.113.70:5050");
        let mut frames = t.handshake();
        frames.push(t.up(b"YMSG"));
        let mut bytes = pcap(&frames);
        bytes.truncate(bytes.len() - 3);
        let r = replay(&e, &bytes[..]).expect("a cut capture replays");
        assert_eq!(r.warnings.len(), 1);
        assert_eq!(r.flows.len(), 1);
    }

    #[test]
    fn reassembly_keeps_first_bytes_and_caps() {
        let mut h = HalfStream::default();
        h.syn(u32::MAX); // byte 0 is at sequence 0: the space wraps
        h.segment(4, b"EFGH", 6, 1);
        assert_eq!(h.contiguous(), 0);
        assert!(h.has_gap());
        h.segment(0, b"ABCD", 6, 2);
        assert_eq!(h.contiguous(), 6);
        assert_eq!(&h.data[..], b"ABCDEF");
        h.segment(2, b"xx", 6, 3); // a differing overlap: first bytes stay
        assert_eq!(&h.data[..], b"ABCDEF");
        h.segment(u32::MAX - 3, b"zzzzA", 6, 4); // starts before byte 0
        assert_eq!(&h.data[..], b"ABCDEF");
        assert_eq!(h.reads, vec![6]);
    }
}
