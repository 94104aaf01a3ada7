//! Latency histograms shared by every worker (the ledger writer here, the projectors, the API):
//! one bucket layout in seconds, so an operator's dashboards compare like with like.

use prometheus::{Histogram, HistogramOpts};

/// Bucket upper bounds in seconds: 0.25 ms doubling to ~8 s (16 buckets and `+Inf`). Admission
/// p50 is around a millisecond and a stalled batch takes seconds; both ends stay resolved.
pub const LATENCY_BUCKETS_SECONDS: [f64; 16] = [
    0.000_25, 0.000_5, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024,
    2.048, 4.096, 8.192,
];

/// A histogram in seconds named `name`, with `labels` as constant labels (e.g. the projection).
pub fn seconds_histogram(name: &str, help: &str, labels: &[(&str, &str)]) -> Histogram {
    let mut opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS_SECONDS.to_vec());
    for (k, v) in labels {
        opts = opts.const_label(*k, *v);
    }
    // Only a malformed name or bucket list fails, and both are constants of this build.
    Histogram::with_opts(opts).expect("metric names and buckets are constants")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_increasing_and_a_histogram_builds() {
        assert!(LATENCY_BUCKETS_SECONDS.windows(2).all(|w| w[0] < w[1]));
        let h = seconds_histogram("tally_test_seconds", "Test.", &[("projection", "usage")]);
        h.observe(0.003);
        assert_eq!(h.get_sample_count(), 1);
    }
}
