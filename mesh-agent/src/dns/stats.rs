//! Counters for `/metrics`: responses by who answered and response code, a latency histogram per answerer, and
//! queries dropped unanswered. Plain atomics in cache-line-aligned shards: each UDP thread bumps its own shard (no
//! cache line bounces between cores at full rate), the async paths (TCP, hickory's UDP queries) share one. The
//! scrape sums the shards.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Who answered a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The agent itself: the cluster zone, and FORMERR for queries it cannot parse.
    Local,
    /// The forwarder: the upstreams' answers, its cache, and SERVFAIL when no upstream answers.
    Upstream,
    /// REFUSED because the client is not in `dns.allowFrom`.
    Acl,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Local, Source::Upstream, Source::Acl];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Upstream => "upstream",
            Source::Acl => "acl",
        }
    }
}

/// Response codes counted apart; the rest are `other`.
pub const RCODES: [&str; 7] = ["NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "other"];

/// The index into [`RCODES`] of a response code (the 4-bit header value, or an extended one).
fn rcode_index(rcode: u16) -> usize {
    usize::from(rcode).min(RCODES.len() - 1)
}

/// Why a query got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Too short for a header, or itself a response.
    Malformed,
    /// Too many queries already waiting on the slow path (mostly on upstreams).
    Overloaded,
}

impl Dropped {
    pub const ALL: [Dropped; 2] = [Dropped::Malformed, Dropped::Overloaded];

    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::Malformed => "malformed",
            Dropped::Overloaded => "overloaded",
        }
    }
}

/// Upper bounds of the latency buckets, in nanoseconds: from a hot-path batch (tens of µs) to an upstream that
/// times out (the forwarder gives up after 1.5 s); `+Inf` follows.
const BOUNDS_NS: [u64; 16] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];
const BUCKETS: usize = BOUNDS_NS.len() + 1;

/// The bucket a latency falls in: the first whose bound it does not exceed, else `+Inf`.
fn bucket(ns: u64) -> usize {
    BOUNDS_NS.partition_point(|&bound| bound < ns)
}

/// One writer's counters, on cache lines of their own.
#[repr(align(128))]
#[derive(Default)]
pub struct Shard {
    responses: [[AtomicU64; RCODES.len()]; Source::ALL.len()],
    /// Per bucket, not cumulative; their total is the histogram's count.
    buckets: [[AtomicU64; BUCKETS]; Source::ALL.len()],
    sum_ns: [AtomicU64; Source::ALL.len()],
    dropped: [AtomicU64; Dropped::ALL.len()],
}

impl Shard {
    /// Counts `n` responses from `source` with `rcode`, sent `latency` after their queries arrived.
    pub fn answered(&self, source: Source, rcode: u16, n: u64, latency: Duration) {
        let s = source as usize;
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.responses[s][rcode_index(rcode)].fetch_add(n, Relaxed);
        self.buckets[s][bucket(ns)].fetch_add(n, Relaxed);
        self.sum_ns[s].fetch_add(ns.saturating_mul(n), Relaxed);
    }

    pub fn dropped(&self, why: Dropped) {
        self.dropped[why as usize].fetch_add(1, Relaxed);
    }
}

/// The server's counters: one shard per UDP thread and one for everything else.
pub struct Stats {
    shards: Box<[Shard]>,
}

/// Counters for the server's UDP threads.
impl Default for Stats {
    fn default() -> Self {
        Self::with_udp_threads(super::server::udp_threads())
    }
}

impl Stats {
    fn with_udp_threads(udp_threads: usize) -> Self {
        Self { shards: (0..udp_threads.max(1) + 1).map(|_| Shard::default()).collect() }
    }

    /// The shard of UDP thread `i`.
    pub fn udp(&self, i: usize) -> &Shard {
        &self.shards[i % (self.shards.len() - 1)]
    }

    /// The shard the async paths share.
    pub fn shared(&self) -> &Shard {
        &self.shards[self.shards.len() - 1]
    }

    fn total(&self, counter: impl Fn(&Shard) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| counter(s).load(Relaxed)).sum()
    }

    /// Responses so far, per source and response code (every pair, zeros too).
    pub fn responses(&self) -> Vec<(Source, &'static str, u64)> {
        Source::ALL
            .iter()
            .flat_map(|&source| RCODES.iter().enumerate().map(move |(r, &rcode)| (source, rcode, r)))
            .map(|(source, rcode, r)| (source, rcode, self.total(|s| &s.responses[source as usize][r])))
            .collect()
    }

    /// The latency histogram of each source.
    pub fn latency(&self) -> Vec<(Source, Histogram)> {
        Source::ALL
            .iter()
            .map(|&source| {
                let s = source as usize;
                let buckets = (0..BUCKETS)
                    .map(|b| {
                        let bound = BOUNDS_NS.get(b).map_or(f64::INFINITY, |&ns| ns as f64 / 1e9);
                        (bound, self.total(|shard| &shard.buckets[s][b]))
                    })
                    .collect();
                (source, Histogram { sum_seconds: self.total(|shard| &shard.sum_ns[s]) as f64 / 1e9, buckets })
            })
            .collect()
    }

    pub fn dropped(&self) -> Vec<(Dropped, u64)> {
        Dropped::ALL.iter().map(|&why| (why, self.total(|s| &s.dropped[why as usize]))).collect()
    }
}

/// A histogram read from the counters, encoded as Prometheus's classic histogram.
#[derive(Debug, PartialEq)]
pub struct Histogram {
    pub sum_seconds: f64,
    /// (upper bound in seconds, observations in this bucket alone), ending with `+Inf`.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|(_, n)| n).sum()
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // the encoder makes the buckets cumulative
        encoder.encode_histogram::<NoLabelSet>(self.sum_seconds, self.count(), &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_in_the_first_bucket_that_holds_them() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(50_000), 0, "a bound is inclusive (le)");
        assert_eq!(bucket(50_001), 1);
        assert_eq!(bucket(999_999), 4);
        assert_eq!(bucket(1_000_000), 4);
        assert_eq!(bucket(5_000_000_000), BUCKETS - 2);
        assert_eq!(bucket(5_000_000_001), BUCKETS - 1, "+Inf");
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn shards_add_up_per_source_and_rcode() {
        let stats = Stats::with_udp_threads(2);
        stats.udp(0).answered(Source::Local, 0, 3, Duration::from_micros(20));
        stats.udp(1).answered(Source::Local, 3, 1, Duration::from_micros(70));
        stats.udp(5).answered(Source::Local, 0, 1, Duration::from_micros(20));
        stats.shared().answered(Source::Upstream, 2, 1, Duration::from_secs(2));
        stats.shared().answered(Source::Upstream, 16, 1, Duration::from_secs(60));
        stats.shared().answered(Source::Acl, 5, 1, Duration::ZERO);
        stats.shared().dropped(Dropped::Overloaded);

        let responses = stats.responses();
        assert_eq!(responses.len(), Source::ALL.len() * RCODES.len());
        let nonzero: Vec<_> = responses.into_iter().filter(|(_, _, n)| *n > 0).collect();
        assert_eq!(
            nonzero,
            [
                (Source::Local, "NOERROR", 4),
                (Source::Local, "NXDOMAIN", 1),
                (Source::Upstream, "SERVFAIL", 1),
                (Source::Upstream, "other", 1),
                (Source::Acl, "REFUSED", 1),
            ]
        );

        let latency = stats.latency();
        let local = &latency[0].1;
        assert_eq!(local.count(), 5);
        assert_eq!(local.buckets.len(), BUCKETS);
        assert_eq!(&local.buckets[..2], [(0.00005, 4), (0.0001, 1)]);
        assert!((local.sum_seconds - 0.000150).abs() < 1e-12, "{}", local.sum_seconds);
        let upstream = &latency[1].1;
        assert_eq!(upstream.buckets[BUCKETS - 3], (2.5, 1));
        assert_eq!(upstream.buckets[BUCKETS - 1], (f64::INFINITY, 1));
        assert_eq!(upstream.sum_seconds, 62.0);
        assert_eq!(stats.dropped(), [(Dropped::Malformed, 0), (Dropped::Overloaded, 1)]);
    }

    #[test]
    fn histograms_encode_cumulatively() {
        let histogram = Histogram { sum_seconds: 0.5, buckets: vec![(0.1, 2), (1.0, 1), (f64::INFINITY, 1)] };
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(One(histogram)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "# TYPE latency_seconds histogram",
            "latency_seconds_sum 0.5",
            "latency_seconds_count 4",
            "latency_seconds_bucket{le=\"0.1\"} 2",
            "latency_seconds_bucket{le=\"1.0\"} 3",
            "latency_seconds_bucket{le=\"+Inf\"} 4",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
    }

    #[derive(Debug)]
    struct One(Histogram);

    impl prometheus_client::collector::Collector for One {
        fn encode(&self, mut e: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let metric = e.encode_descriptor("latency_seconds", "test", None, MetricType::Histogram)?;
            self.0.encode(metric)
        }
    }
}
