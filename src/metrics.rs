//! `/metrics` in the Prometheus text format (version 0.0.4).
//!
//! The router renders what each shard reported by message; no counter here is
//! shared between threads.

use std::fmt::Write;

use crate::router::RouterCounters;
use crate::shard::message::ShardStats;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// One per-shard series: name, help text, and how to read it from stats.
type Series = (&'static str, &'static str, fn(&ShardStats) -> u64);

/// Renders router counters and one stats record per shard that answered.
pub fn render(router: &RouterCounters, shard_count: usize, shards: &[ShardStats]) -> String {
    let mut out = String::with_capacity(4096);

    family(
        &mut out,
        "shardgate_shards",
        "gauge",
        "Configured shard count.",
    );
    let _ = writeln!(out, "shardgate_shards {shard_count}");
    family(
        &mut out,
        "shardgate_shards_answering",
        "gauge",
        "Shards that answered this scrape.",
    );
    let _ = writeln!(out, "shardgate_shards_answering {}", shards.len());

    family(
        &mut out,
        "shardgate_accepted_total",
        "counter",
        "TCP connections accepted.",
    );
    let _ = writeln!(out, "shardgate_accepted_total {}", router.accepted.get());
    family(
        &mut out,
        "shardgate_handoffs_sent_total",
        "counter",
        "Upgrades handed to shards.",
    );
    let _ = writeln!(
        out,
        "shardgate_handoffs_sent_total {}",
        router.handed_off.get()
    );
    family(
        &mut out,
        "shardgate_api_requests_total",
        "counter",
        "API requests received.",
    );
    let _ = writeln!(
        out,
        "shardgate_api_requests_total {}",
        router.api_requests.get()
    );
    family(
        &mut out,
        "shardgate_router_refused_total",
        "counter",
        "Requests refused by the router.",
    );
    for (reason, count) in router.refused.borrow().iter() {
        let _ = writeln!(
            out,
            "shardgate_router_refused_total{{reason=\"{reason}\"}} {count}"
        );
    }

    let gauges: [Series; 4] = [
        (
            "shardgate_shard_users",
            "Users with a manager on the shard.",
            |s| s.users as u64,
        ),
        (
            "shardgate_shard_connections",
            "Open /ws connections.",
            |s| s.connections as u64,
        ),
        (
            "shardgate_shard_echo_connections",
            "Open /ws/echo connections.",
            |s| s.echo_connections as u64,
        ),
        (
            "shardgate_shard_queued_messages",
            "Frames queued and not yet written.",
            |s| s.queued_messages as u64,
        ),
    ];
    for (name, help, value) in gauges {
        family(&mut out, name, "gauge", help);
        for stats in shards {
            let _ = writeln!(out, "{name}{{shard=\"{}\"}} {}", stats.shard, value(stats));
        }
    }

    let counters: [Series; 18] = [
        (
            "shardgate_shard_handoffs_total",
            "Hand-offs received.",
            |s| s.handoffs,
        ),
        (
            "shardgate_shard_messages_received_total",
            "Data messages received on /ws.",
            |s| s.messages_received,
        ),
        (
            "shardgate_shard_messages_delivered_total",
            "Messages queued to connections.",
            |s| s.messages_delivered,
        ),
        (
            "shardgate_shard_refused_user_cap_total",
            "Upgrades refused with 429.",
            |s| s.refused_user_cap,
        ),
        (
            "shardgate_shard_refused_shard_cap_total",
            "Upgrades refused with 503, shard full.",
            |s| s.refused_shard_cap,
        ),
        (
            "shardgate_shard_refused_late_total",
            "Hand-offs past their deadline.",
            |s| s.refused_late,
        ),
        (
            "shardgate_shard_refused_revoked_total",
            "Upgrades with a revoked token.",
            |s| s.refused_revoked,
        ),
        (
            "shardgate_shard_refused_draining_total",
            "Upgrades refused while draining.",
            |s| s.refused_draining,
        ),
        (
            "shardgate_shard_protocol_errors_total",
            "Closes for RFC 6455 violations.",
            |s| s.protocol_errors,
        ),
        (
            "shardgate_shard_bad_messages_total",
            "Frames answered bad_message.",
            |s| s.bad_messages,
        ),
        (
            "shardgate_shard_forbidden_total",
            "Frames naming another user.",
            |s| s.forbidden,
        ),
        (
            "shardgate_shard_rate_limited_total",
            "Messages refused by the rate limit.",
            |s| s.rate_limited,
        ),
        (
            "shardgate_shard_abuse_closes_total",
            "Connections closed with 1008.",
            |s| s.abuse_closes,
        ),
        (
            "shardgate_shard_slow_consumers_total",
            "Connections closed with 4008.",
            |s| s.slow_consumers,
        ),
        (
            "shardgate_shard_pong_timeouts_total",
            "Connections dropped for a missing pong.",
            |s| s.pong_timeouts,
        ),
        (
            "shardgate_shard_expired_total",
            "Connections closed with 4001 at expiry.",
            |s| s.expired,
        ),
        (
            "shardgate_shard_panics_total",
            "Panics caught on the shard.",
            |s| s.panics,
        ),
        (
            "shardgate_shard_isolation_violations_total",
            "Refused cross-user operations.",
            |s| s.isolation_violations,
        ),
    ];
    for (name, help, value) in counters {
        family(&mut out, name, "counter", help);
        for stats in shards {
            let _ = writeln!(out, "{name}{{shard=\"{}\"}} {}", stats.shard, value(stats));
        }
    }

    let name = "shardgate_shard_handoff_latency_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Accept to 101 written, per shard.",
    );
    for stats in shards {
        for &(bound, count) in &stats.handoff_latency_us {
            let le = if bound == u64::MAX {
                "+Inf".to_owned()
            } else {
                format!("{}", bound as f64 / 1e6)
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{shard=\"{}\",le=\"{le}\"}} {count}",
                stats.shard
            );
        }
        let sum = stats.handoff_latency_sum_us as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{shard=\"{}\"}} {sum}", stats.shard);
        let count = stats
            .handoff_latency_us
            .last()
            .map_or(0, |&(_, count)| count);
        let _ = writeln!(out, "{name}_count{{shard=\"{}\"}} {count}", stats.shard);
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_shard_series() {
        let router = RouterCounters::default();
        router.refuse("token_refused");
        let stats = ShardStats {
            shard: 1,
            users: 2,
            connections: 3,
            handoff_latency_us: vec![(100, 1), (u64::MAX, 2)],
            ..ShardStats::default()
        };
        let text = render(&router, 2, &[stats]);
        assert!(text.contains("shardgate_shard_users{shard=\"1\"} 2\n"));
        assert!(text.contains("shardgate_shard_connections{shard=\"1\"} 3\n"));
        assert!(text.contains("shardgate_router_refused_total{reason=\"token_refused\"} 1\n"));
        assert!(text.contains("le=\"+Inf\"} 2\n"));
        assert!(text.contains("le=\"0.0001\"} 1\n"));
    }
}
