//! Counters for `GET /metrics` (Prometheus text exposition, written by hand: a handful
//! of series does not need a metrics library). Gauges are computed from the state when
//! scraped.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A gauge family: name, help text, label name, and a value per label value.
pub type Gauge<'a> = (&'a str, &'a str, &'a str, Vec<(String, u64)>);

#[derive(Debug, Default)]
pub struct Metrics {
    pub heartbeats: AtomicU64,
    pub placements_placed: AtomicU64,
    pub placements_refused: AtomicU64,
    /// HTTP answers by status code.
    requests: Mutex<BTreeMap<u16, u64>>,
}

impl Metrics {
    pub fn request(&self, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(status).or_default() += 1;
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text; `gauges` are (name, help, [(label value, value)]).
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let mut out = String::new();
        for (name, help, label, values) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (value_label, v) in values {
                let _ = writeln!(out, "{name}{{{label}=\"{value_label}\"}} {v}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP away_heartbeats_total Agent heartbeats accepted.\n# TYPE away_heartbeats_total counter\naway_heartbeats_total {}",
            self.heartbeats.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP away_placements_total Placement decisions made, by result.\n# TYPE away_placements_total counter\n\
             away_placements_total{{result=\"placed\"}} {}\naway_placements_total{{result=\"refused\"}} {}",
            self.placements_placed.load(Ordering::Relaxed),
            self.placements_refused.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP away_http_requests_total HTTP requests answered, by status code.\n# TYPE away_http_requests_total counter"
        );
        let map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        for (code, n) in map.iter() {
            let _ = writeln!(out, "away_http_requests_total{{code=\"{code}\"}} {n}");
        }
        out
    }
}
