//! The hot path: answers the common query shape (one uncompressed IN question, at most an EDNS OPT record) for the
//! cluster zone straight from the wire, with the table's pre-encoded answers, into a reused buffer — no allocation,
//! no lock. Everything else is left to hickory ([`Fast::Slow`]), which parses fully and answers or forwards.

use hickory_server::proto::rr::RecordType;

use super::table::{Lookup, Table};

const HEADER: usize = 12;
const MAX_NAME: usize = 255;
const OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// The payload size we announce over EDNS (the DNS flag day 2020 value, which avoids IP fragmentation).
pub const EDNS_PAYLOAD: u16 = 1232;

/// What the hot path did with a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Fast {
    /// The response is in the output buffer.
    Reply,
    /// Not the common shape, or not a cluster-zone name: hickory's turn.
    Slow,
    /// Not worth an answer: too short for a header, or itself a response (answering those would make us a reflector).
    Drop,
}

struct Question {
    /// End of the question section in the packet.
    end: usize,
    qtype: u16,
    /// The client's EDNS payload size and DO bit, if it sent an OPT record.
    edns: Option<(u16, bool)>,
}

/// Answers `packet` into `out` if it is a plain query for the cluster zone.
pub fn answer(table: &Table, packet: &[u8], out: &mut Vec<u8>) -> Fast {
    if packet.len() < HEADER || packet[2] & 0x80 != 0 {
        return Fast::Drop;
    }
    let mut name = [0u8; MAX_NAME];
    let Some((q, name_len)) = parse(packet, &mut name) else {
        return Fast::Slow;
    };
    let (rcode, body, answers, authorities) = match table.lookup(&name[..name_len]) {
        Lookup::Outside => return Fast::Slow,
        Lookup::NxDomain => (3, table.soa_wire(), 0, 1),
        Lookup::Node(node) => match node.rrset(RecordType::from(q.qtype)) {
            Some(set) => (0, &*set.wire, set.records.len() as u16, 0),
            // ANY, zone transfers and the like take hickory's path
            None if matches!(q.qtype, 251..=255) => return Fast::Slow,
            None => (0, table.soa_wire(), 0, 1),
        },
    };
    let limit = match q.edns {
        Some((payload, _)) => usize::from(payload.clamp(512, EDNS_PAYLOAD)),
        None => 512,
    };
    out.clear();
    out.extend_from_slice(&packet[..q.end]);
    // QR, AA, RA set; opcode (0), RD and CD kept from the query; TC, Z and AD clear
    out[2] = 0x80 | 0x04 | (packet[2] & 0x01);
    out[3] = 0x80 | (packet[3] & 0x10) | rcode;
    let opt_len = if q.edns.is_some() { 11 } else { 0 };
    let (answers, authorities) = if out.len() + body.len() + opt_len <= limit {
        out.extend_from_slice(body);
        (answers, authorities)
    } else {
        // does not fit: say so, and the client retries over TCP
        out[2] |= 0x02;
        (0, 0)
    };
    out[4..12].copy_from_slice(&[0, 1, (answers >> 8) as u8, answers as u8, 0, authorities, 0, 0]);
    if let Some((_, dnssec_ok)) = q.edns {
        out[11] = 1;
        let [hi, lo] = EDNS_PAYLOAD.to_be_bytes();
        out.extend_from_slice(&[0, 0, OPT as u8, hi, lo, 0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
    }
    Fast::Reply
}

/// Parses the common query shape, writing the lowercased question name into `name`; `None` for anything else.
fn parse(packet: &[u8], name: &mut [u8; MAX_NAME]) -> Option<(Question, usize)> {
    let be16 = |at: usize| packet.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    // opcode QUERY, one question, nothing but an optional OPT record besides
    if packet[2] & 0x78 != 0 || be16(4)? != 1 || be16(6)? != 0 || be16(8)? != 0 {
        return None;
    }
    let additional = be16(10)?;
    let mut pos = HEADER;
    let mut len = 0;
    loop {
        let label = usize::from(*packet.get(pos)?);
        // 0xc0 (compression) and the reserved 0x40/0x80 forms are left to the full parser
        if label > 63 || len + label + 1 > MAX_NAME {
            return None;
        }
        name[len] = label as u8;
        let bytes = packet.get(pos + 1..pos + 1 + label)?;
        for (dst, src) in name[len + 1..len + 1 + label].iter_mut().zip(bytes) {
            *dst = src.to_ascii_lowercase();
        }
        len += label + 1;
        pos += label + 1;
        if label == 0 {
            break;
        }
    }
    let qtype = be16(pos)?;
    if be16(pos + 2)? != CLASS_IN {
        return None;
    }
    let end = pos + 4;
    let edns = match additional {
        0 if end == packet.len() => None,
        1 => {
            // root owner, type OPT, version 0, and the record must end the packet
            let rdlen = usize::from(be16(end + 9)?);
            if *packet.get(end)? != 0
                || be16(end + 1)? != OPT
                || packet[end + 6] != 0
                || end + 11 + rdlen != packet.len()
            {
                return None;
            }
            Some((be16(end + 3)?, packet[end + 7] & 0x80 != 0))
        }
        _ => return None,
    };
    Some((Question { end, qtype, edns }, len))
}

/// FORMERR for a query hickory could not parse, if the packet has a query header to answer.
pub fn formerr(packet: &[u8]) -> Option<Vec<u8>> {
    if packet.len() < HEADER || packet[2] & 0x80 != 0 {
        return None;
    }
    let mut out = packet[..HEADER].to_vec();
    // keep the opcode and RD; QR set; RA set; rcode FORMERR; no sections
    out[2] = 0x80 | (packet[2] & 0x79);
    out[3] = 0x80 | 1;
    out[4..].fill(0);
    Some(out)
}
