//! hickory's side of the server: every query the hot path does not take (TCP, unusual shapes, ANY, names outside the
//! cluster zone) comes here as a parsed [`Request`]. Cluster-zone names are answered from the same table; the rest
//! goes to the forwarder. Sources outside the allow list get REFUSED for everything.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::{DNSClass, Record, RecordType};
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};

use super::allow::AllowList;
use super::forward::Forwarder;
use super::stats::{Source, Stats};
use super::table::{wire_name, Lookup, Table};
use super::wire::EDNS_PAYLOAD;

#[derive(Clone)]
pub struct Handler {
    pub table: Arc<ArcSwap<Table>>,
    pub allow: Arc<ArcSwap<AllowList>>,
    forwarder: Arc<Forwarder>,
    pub stats: Arc<Stats>,
}

/// A cluster-zone answer, borrowed from the table.
pub struct ZoneAnswer<'t> {
    pub rcode: ResponseCode,
    pub answers: Vec<&'t Record>,
    pub soa: Option<&'t Record>,
}

impl Handler {
    pub fn new(
        table: Arc<ArcSwap<Table>>,
        allow: Arc<ArcSwap<AllowList>>,
        forwarder: Forwarder,
        stats: Arc<Stats>,
    ) -> Self {
        Self { table, allow, forwarder: Arc::new(forwarder), stats }
    }

    /// Answers `request` through `response` and says who answered; the caller counts it.
    pub async fn respond<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> (Source, ResponseInfo) {
        let edns = response_edns(request);
        let failed = || failed(request);
        if !self.allow.load().allows(request.src().ip()) {
            let sent = response.send_response(error_response(request, ResponseCode::Refused, edns.as_ref())).await;
            return (Source::Acl, sent.unwrap_or_else(|_| failed()));
        }
        let table = self.table.load_full();
        if let Some(answer) = zone_answer(&table, request) {
            let message = zone_response(request, &answer, edns.as_ref());
            return (Source::Local, response.send_response(message).await.unwrap_or_else(|_| failed()));
        }
        let info = match self.forwarder.catalog() {
            Some(catalog) => catalog.handle_request::<R, T>(request, response).await,
            None => response
                .send_response(error_response(request, ResponseCode::ServFail, edns.as_ref()))
                .await
                .unwrap_or_else(|_| failed()),
        };
        (Source::Upstream, info)
    }
}

/// The cluster-zone answer to `request`, or `None` when its name is not ours.
pub fn zone_answer<'t>(table: &'t Table, request: &Request) -> Option<ZoneAnswer<'t>> {
    if request.metadata.op_code != OpCode::Query {
        return None;
    }
    let query = request.request_info().ok()?.query;
    let node = match table.lookup(&wire_name(query.name())) {
        Lookup::Outside => return None,
        Lookup::NxDomain => {
            return Some(ZoneAnswer { rcode: ResponseCode::NXDomain, answers: Vec::new(), soa: Some(table.soa()) })
        }
        Lookup::Node(node) => node,
    };
    let qtype = query.query_type();
    let answers: Vec<&Record> = if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
        Vec::new()
    } else if qtype == RecordType::ANY {
        node.rrsets.iter().flat_map(|s| &s.records).collect()
    } else {
        node.rrset(qtype).map(|s| s.records.iter().collect()).unwrap_or_default()
    };
    let soa = answers.is_empty().then(|| table.soa());
    Some(ZoneAnswer { rcode: ResponseCode::NoError, answers, soa })
}

/// The response EDNS record for a request that carried one.
pub fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|req| {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        edns.set_dnssec_ok(req.flags().dnssec_ok);
        edns
    })
}

/// Builds the response message for a zone answer.
pub fn zone_response<'q, 'a>(
    request: &'q Request,
    answer: &ZoneAnswer<'a>,
    edns: Option<&'q Edns>,
) -> MessageResponse<
    'q,
    'a,
    impl Iterator<Item = &'a Record> + Send + 'a,
    impl Iterator<Item = &'a Record> + Send + 'a,
    impl Iterator<Item = &'a Record> + Send + 'a,
    impl Iterator<Item = &'a Record> + Send + 'a,
> {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = true;
    metadata.recursion_available = true;
    metadata.response_code = answer.rcode;
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = edns {
        builder.edns(edns);
    }
    builder.build(metadata, answer.answers.clone(), std::iter::empty(), answer.soa, std::iter::empty())
}

/// Encodes a response for UDP: within the client's payload size (512 without EDNS), truncated (TC) beyond it.
pub fn encode_udp<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    max_payload: u16,
) -> Option<(ResponseInfo, Vec<u8>)> {
    let mut buf = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_max_size(max_payload.clamp(512, EDNS_PAYLOAD));
    let info = response.destructive_emit(&mut encoder).ok()?;
    Some((info, buf))
}

fn error_response<'q>(
    request: &'q Request,
    rcode: ResponseCode,
    edns: Option<&'q Edns>,
) -> MessageResponse<
    'q,
    'static,
    impl Iterator<Item = &'static Record> + Send + 'static,
    impl Iterator<Item = &'static Record> + Send + 'static,
    impl Iterator<Item = &'static Record> + Send + 'static,
    impl Iterator<Item = &'static Record> + Send + 'static,
> {
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = edns {
        builder.edns(edns);
    }
    let mut response = builder.error_msg(&request.metadata, rcode);
    response.metadata_mut().recursion_available = true;
    response
}

/// What a handler reports when the response could not be sent.
fn failed(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
}

/// TCP queries come here, timed from when hickory has read them (UDP ones go through [`Handler::respond`], timed from
/// when their batch was read).
#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, response: R) -> ResponseInfo {
        let start = Instant::now();
        let (source, info) = self.respond::<R, T>(request, response).await;
        self.stats.shared().answered(source, info.response_code.into(), 1, start.elapsed());
        info
    }
}
