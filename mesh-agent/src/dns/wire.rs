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

#[cfg(test)]
mod tests {
    use hickory_server::net::xfer::Protocol;
    use hickory_server::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_server::proto::rr::{Name, RecordType};
    use hickory_server::server::Request;

    use super::*;
    use crate::dns::handle_packet;
    use crate::dns::handler::zone_answer;
    use crate::dns::table::tests::sample;

    fn query(name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
        let mut message = Message::new(0x1234, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            message.edns = Some(e);
        }
        message.to_vec().unwrap()
    }

    fn ask(table: &Table, packet: &[u8]) -> Message {
        Message::from_vec(&handle_packet(table, packet).expect("an answer")).expect("a valid response")
    }

    fn fast(table: &Table, packet: &[u8]) -> Fast {
        answer(table, packet, &mut Vec::new())
    }

    #[test]
    fn hot_path_answers_match_the_table() {
        let t = sample();
        for (name, rtype) in [
            ("web.default.svc.cluster.local.", RecordType::A),
            ("web6.default.svc.cluster.local.", RecordType::AAAA),
            ("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV),
            ("_http._tcp.db.default.svc.cluster.local.", RecordType::SRV),
            ("db.default.svc.cluster.local.", RecordType::A),
            ("10.0.250.10.in-addr.arpa.", RecordType::PTR),
            ("dns-version.cluster.local.", RecordType::TXT),
            ("cluster.local.", RecordType::SOA),
        ] {
            for edns in [false, true] {
                let packet = query(name, rtype, edns);
                assert_eq!(fast(&t, &packet), Fast::Reply, "{name} {rtype}");
                let response = ask(&t, &packet);
                assert_eq!(response.metadata.id, 0x1234);
                assert!(response.metadata.authoritative && response.metadata.recursion_desired);
                assert_eq!(response.metadata.response_code, ResponseCode::NoError);
                assert_eq!(response.edns.is_some(), edns);
                let request = Request::from_bytes(packet, ([127, 0, 0, 1], 9).into(), Protocol::Udp).unwrap();
                let want = zone_answer(&t, &request).unwrap().answers;
                let want: Vec<_> = want.into_iter().cloned().collect();
                assert_eq!(response.answers, want, "{name} {rtype}");
                assert!(!want.is_empty());
            }
        }
    }

    #[test]
    fn question_case_is_echoed() {
        let t = sample();
        let response = ask(&t, &query("WeB.default.svc.Cluster.Local.", RecordType::A, false));
        assert_eq!(response.queries[0].name().to_string(), "WeB.default.svc.Cluster.Local.");
        assert_eq!(response.answers.len(), 1);
        assert_eq!(response.answers[0].data.to_string(), "10.250.0.10");
    }

    #[test]
    fn negative_answers_carry_the_soa() {
        let t = sample();
        for (name, rtype, rcode) in [
            ("nope.default.svc.cluster.local.", RecordType::A, ResponseCode::NXDomain),
            ("web.default.svc.cluster.local.", RecordType::AAAA, ResponseCode::NoError),
            ("default.svc.cluster.local.", RecordType::A, ResponseCode::NoError),
            ("db-2.db.default.svc.cluster.local.", RecordType::A, ResponseCode::NXDomain),
        ] {
            let response = ask(&t, &query(name, rtype, true));
            assert_eq!(response.metadata.response_code, rcode, "{name} {rtype}");
            assert!(response.answers.is_empty());
            assert_eq!(response.authorities.len(), 1);
            assert_eq!(response.authorities[0].record_type(), RecordType::SOA);
        }
    }

    #[test]
    fn large_answers_truncate_over_udp() {
        let t = sample();
        let response = ask(&t, &query("many.default.svc.cluster.local.", RecordType::A, false));
        assert!(response.metadata.truncation);
        assert!(response.answers.is_empty());
        let response = ask(&t, &query("many.default.svc.cluster.local.", RecordType::A, true));
        assert!(response.metadata.truncation, "100 A records exceed 1232 bytes");
    }

    #[test]
    fn other_shapes_take_hickorys_path() {
        let t = sample();
        assert_eq!(fast(&t, &query("example.com.", RecordType::A, false)), Fast::Slow);
        assert_eq!(fast(&t, &query("web.default.svc.cluster.local.", RecordType::ANY, false)), Fast::Slow);
        let any = ask(&t, &query("web.default.svc.cluster.local.", RecordType::ANY, false));
        assert_eq!(any.answers.len(), 1);
        assert!(handle_packet(&t, &query("example.com.", RecordType::A, false)).is_none(), "forwarded");
        // a compressed question name: hickory parses it, and the answer is the same
        let mut packet = query("web.default.svc.cluster.local.", RecordType::A, false);
        packet[5] = 2; // two questions: the second a pointer to the first
        packet.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(fast(&t, &packet), Fast::Slow);
    }

    #[test]
    fn malformed_packets_get_formerr_or_nothing() {
        let t = sample();
        let formerr = |packet: &[u8]| {
            let response = Message::from_vec(&handle_packet(&t, packet).expect("FORMERR")).unwrap();
            assert_eq!(response.metadata.response_code, ResponseCode::FormErr, "{packet:?}");
        };
        // a runt, and a response: no answer
        assert!(handle_packet(&t, &[0x12, 0x34, 0x01]).is_none());
        let mut response = query("web.default.svc.cluster.local.", RecordType::A, false);
        response[2] |= 0x80;
        assert!(handle_packet(&t, &response).is_none());
        // a header promising a question that is not there
        formerr(&[0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        // a question cut short
        let whole = query("web.default.svc.cluster.local.", RecordType::A, false);
        formerr(&whole[..whole.len() - 3]);
        // a label length running past the end
        formerr(&[0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 70, b'a', b'b', 0, 0, 1, 0, 1]);
        // a compression pointer to itself, and two pointing at each other
        formerr(&[0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1]);
        formerr(&[0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0xc0, 16, 0xc0, 12, 0, 1, 0, 1]);
    }
}
