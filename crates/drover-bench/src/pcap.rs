//! Reading the packets tcpdump captured (the classic pcap file format): for each IPv4 TCP
//! packet, when it was seen, its ports, its size on the wire at the IP layer (headers
//! included, from the IP header's total length) and how many TLS records start in its payload.

use anyhow::{Context as _, bail};

/// One captured TCP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// When it was captured (Unix microseconds).
    pub ts_us: i64,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Bytes of the IP packet: IP header, TCP header and payload.
    pub ip_bytes: u32,
    /// Bytes of the IP and TCP headers (options included).
    pub header_bytes: u32,
    /// TLS records whose header starts in this packet's payload (walking from its start, so
    /// right for the small messages that fit one segment).
    pub tls_records: u32,
    /// Whether it carries the SYN flag.
    pub syn: bool,
}

impl Packet {
    /// Bytes of TCP payload.
    pub fn payload_bytes(&self) -> u32 {
        self.ip_bytes.saturating_sub(self.header_bytes)
    }
}

/// Parses a pcap file's bytes; packets that are not IPv4 TCP are skipped.
pub fn parse(bytes: &[u8]) -> anyhow::Result<Vec<Packet>> {
    let header = bytes
        .get(..24)
        .context("the capture file is shorter than its header")?;
    let magic = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let (little, nanos) = match magic {
        0xa1b2_c3d4 => (true, false),
        0xa1b2_3c4d => (true, true),
        0xd4c3_b2a1 => (false, false),
        0x4d3c_b2a1 => (false, true),
        other => bail!("not a pcap file (magic {other:#010x})"),
    };
    let u32_at = |b: &[u8], at: usize| -> u32 {
        let four = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if little {
            u32::from_le_bytes(four)
        } else {
            u32::from_be_bytes(four)
        }
    };
    let link_header = match u32_at(header, 20) {
        0 => 4,
        1 => 14,
        12 | 101 => 0,
        113 => 16,
        276 => 20,
        other => bail!("the capture's link type {other} is not one this reader knows"),
    };
    let mut packets = Vec::new();
    let mut at = 24;
    while let Some(record) = bytes.get(at..at + 16) {
        let seconds = i64::from(u32_at(record, 0));
        let fraction = i64::from(u32_at(record, 4));
        let captured = u32_at(record, 8) as usize;
        let data = bytes
            .get(at + 16..at + 16 + captured)
            .context("the capture file ends inside a packet")?;
        at += 16 + captured;
        let ts_us = seconds * 1_000_000 + if nanos { fraction / 1000 } else { fraction };
        if let Some(packet) = data.get(link_header..).and_then(|ip| tcp_packet(ip, ts_us)) {
            packets.push(packet);
        }
    }
    Ok(packets)
}

/// An IPv4 TCP packet's fields, or `None` for anything else (or a truncated capture).
fn tcp_packet(ip: &[u8], ts_us: i64) -> Option<Packet> {
    let first = *ip.first()?;
    if first >> 4 != 4 || *ip.get(9)? != 6 {
        return None;
    }
    let ip_header = usize::from(first & 0x0f) * 4;
    let ip_bytes = u32::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let tcp = ip.get(ip_header..)?;
    let tcp_header = usize::from(*tcp.get(12)? >> 4) * 4;
    let payload_len = (ip_bytes as usize).checked_sub(ip_header + tcp_header)?;
    let payload = tcp.get(tcp_header..tcp_header + payload_len).unwrap_or(&[]);
    Some(Packet {
        ts_us,
        src_port: u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]),
        dst_port: u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]),
        ip_bytes,
        header_bytes: u32::try_from(ip_header + tcp_header).ok()?,
        tls_records: tls_records(payload),
        syn: tcp.get(13)? & 0x02 != 0,
    })
}

/// How many TLS records start in `payload`, walking record headers from its start.
fn tls_records(payload: &[u8]) -> u32 {
    let mut records = 0;
    let mut at = 0;
    while let Some(header) = payload.get(at..at + 5) {
        let known_type = (20..=24).contains(&header[0]);
        if !known_type || header[1] != 3 {
            break;
        }
        records += 1;
        at += 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcp_packet_with_two_tls_records_is_read() {
        let mut file = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        file.extend([0; 8]);
        file.extend(65535u32.to_le_bytes());
        file.extend(1u32.to_le_bytes()); // Ethernet
        let payload = [[0x17, 3, 3, 0, 1, 0xaa], [0x17, 3, 3, 0, 1, 0xbb]].concat();
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1,
        ];
        let total = (20 + 32 + payload.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let mut tcp = vec![0; 32];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&8443u16.to_be_bytes());
        tcp[12] = 8 << 4;
        let frame = [vec![0; 14], ip, tcp, payload].concat();
        file.extend(7u32.to_le_bytes());
        file.extend(5u32.to_le_bytes());
        file.extend((frame.len() as u32).to_le_bytes());
        file.extend((frame.len() as u32).to_le_bytes());
        file.extend(&frame);
        let packets = parse(&file).unwrap();
        assert_eq!(
            packets,
            vec![Packet {
                ts_us: 7_000_005,
                src_port: 40000,
                dst_port: 8443,
                ip_bytes: u32::from(total),
                header_bytes: 52,
                tls_records: 2,
                syn: false,
            }]
        );
        assert!(parse(b"short").is_err());
    }
}
