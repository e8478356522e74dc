//! Summaries (median with min–max over interleaved runs), the stdout table,
//! shardgate / peer ratios and the JSON file.

use std::fmt::Write as _;
use std::path::Path;

use crate::scenarios::RunResult;

/// Server CPU below this share of its cores marks a run as client-bound.
const BUSY_SHARE: f64 = 0.9;
/// Other processes using more than this many cores mark a run as noisy.
pub const NOISE_CORES: f64 = 0.15;

pub struct Row {
    pub section: String,
    pub config: String,
    pub target: String,
    pub unit: &'static str,
    pub cores: f64,
    /// Whether "client-bound" applies (not for memory figures).
    pub load: bool,
    pub runs: Vec<RunResult>,
}

pub struct Ratio {
    pub section: String,
    pub config: String,
    pub num: String,
    pub den: String,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub ratios: Vec<Ratio>,
    pub notes: Vec<String>,
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub server_cpu: f64,
    pub gen_cpu: f64,
    pub other_cpu: f64,
    pub client_bound: usize,
    pub gen_saturated: usize,
    pub noisy: usize,
    pub errors: u64,
}

impl Row {
    pub fn summary(&self) -> Summary {
        let pick = |f: fn(&RunResult) -> f64| {
            let mut v: Vec<f64> = self.runs.iter().map(f).collect();
            median(&mut v)
        };
        let values: Vec<f64> = self.runs.iter().map(|r| r.value).collect();
        Summary {
            median: pick(|r| r.value),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            p50: pick(|r| r.p50_us),
            p99: pick(|r| r.p99_us),
            p999: pick(|r| r.p999_us),
            server_cpu: pick(|r| r.server_cpu),
            gen_cpu: pick(|r| r.gen_cpu),
            other_cpu: pick(|r| r.other_cpu),
            gen_saturated: if self.load {
                self.runs.iter().filter(|r| r.gen_cpu > BUSY_SHARE).count()
            } else {
                0
            },
            noisy: if self.load {
                self.runs
                    .iter()
                    .filter(|r| r.other_cpu > NOISE_CORES)
                    .count()
            } else {
                0
            },
            client_bound: if self.load {
                self.runs
                    .iter()
                    .filter(|r| r.server_cpu < BUSY_SHARE * self.cores)
                    .count()
            } else {
                0
            },
            errors: self.runs.iter().map(|r| r.errors).sum(),
        }
    }
}

/// 1234567.8 -> "1,234,568"; small values keep a decimal.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    if v.abs() < 100.0 {
        return format!("{v:.1}");
    }
    let s = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

fn lat(v: f64) -> String {
    if v == 0.0 {
        "-".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

pub const HEADER: &str = "| scenario | config | server | median | min–max | p50 µs | p99 µs \
    | p99.9 µs | server CPU | gen CPU | other CPU | flags |\n\
    | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |";

impl Report {
    pub fn row_line(row: &Row) -> String {
        let s = row.summary();
        let mut flags = Vec::new();
        if s.client_bound > 0 {
            flags.push(format!(
                "client-bound {}/{}",
                s.client_bound,
                row.runs.len()
            ));
        }
        if s.gen_saturated > 0 {
            flags.push(format!(
                "generator saturated {}/{}",
                s.gen_saturated,
                row.runs.len()
            ));
        }
        if s.noisy > 0 {
            flags.push(format!("noisy {}/{}", s.noisy, row.runs.len()));
        }
        let stalls = row.runs.iter().filter(|r| r.stall_ms >= 200.0).count();
        if stalls > 0 {
            let worst = row.runs.iter().map(|r| r.stall_ms).fold(0.0, f64::max);
            flags.push(format!(
                "stalled {stalls}/{} (longest {worst:.0} ms)",
                row.runs.len()
            ));
        }
        if s.errors > 0 {
            let note = row
                .runs
                .iter()
                .find_map(|r| r.note.clone())
                .unwrap_or_default();
            flags.push(format!("errors {} ({note})", s.errors));
        }
        format!(
            "| {} | {} | {} | {} {} | {}–{} | {} | {} | {} | {:.0} % | {:.0} % | {:.0} % | {} |",
            row.section,
            row.config,
            row.target,
            num(s.median),
            row.unit,
            num(s.min),
            num(s.max),
            lat(s.p50),
            lat(s.p99),
            lat(s.p999),
            s.server_cpu * 100.0,
            s.gen_cpu * 100.0,
            s.other_cpu * 100.0,
            flags.join("; ")
        )
    }

    fn find(&self, section: &str, config: &str, target: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.section == section && r.config == config && r.target == target)
    }

    pub fn ratio_line(&self, ratio: &Ratio) -> Option<String> {
        let a = self
            .find(&ratio.section, &ratio.config, &ratio.num)?
            .summary();
        let b = self
            .find(&ratio.section, &ratio.config, &ratio.den)?
            .summary();
        if b.median == 0.0 {
            return None;
        }
        Some(format!(
            "| {} | {} | {} / {} | {:.2}× |",
            ratio.section,
            ratio.config,
            ratio.num,
            ratio.den,
            a.median / b.median
        ))
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        writeln!(out, "{HEADER}").unwrap();
        for row in &self.rows {
            writeln!(out, "{}", Self::row_line(row)).unwrap();
        }
        if !self.ratios.is_empty() {
            writeln!(
                out,
                "\n| scenario | config | shardgate / peer (medians) | ratio |\n\
                 | --- | --- | --- | --- |"
            )
            .unwrap();
            for ratio in &self.ratios {
                if let Some(line) = self.ratio_line(ratio) {
                    writeln!(out, "{line}").unwrap();
                }
            }
        }
        out
    }

    pub fn write_json(&self, path: &Path, settings: serde_json::Value) {
        let rows: Vec<_> = self
            .rows
            .iter()
            .map(|row| {
                let s = row.summary();
                serde_json::json!({
                    "scenario": row.section,
                    "config": row.config,
                    "server": row.target,
                    "unit": row.unit,
                    "cores": row.cores,
                    "median": s.median,
                    "min": s.min,
                    "max": s.max,
                    "p50_us": s.p50,
                    "p99_us": s.p99,
                    "p999_us": s.p999,
                    "server_cpu": s.server_cpu,
                    "gen_cpu": s.gen_cpu,
                    "other_cpu": s.other_cpu,
                    "client_bound_runs": s.client_bound,
                    "noisy_runs": s.noisy,
                    "generator_saturated_runs": s.gen_saturated,
                    "errors": s.errors,
                    "runs": row.runs.iter().map(|r| serde_json::json!({
                        "value": r.value,
                        "p50_us": r.p50_us,
                        "p99_us": r.p99_us,
                        "p999_us": r.p999_us,
                        "samples": r.samples,
                        "server_cpu": r.server_cpu,
                        "gen_cpu": r.gen_cpu,
                        "other_cpu": r.other_cpu,
                        "stall_ms": r.stall_ms,
                        "stall_state": r.stall_state,
                        "errors": r.errors,
                        "note": r.note,
                        "extra": r
                            .extra
                            .iter()
                            .map(|(k, v)| ((*k).to_string(), serde_json::json!(v)))
                            .collect::<serde_json::Map<_, _>>(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let ratios: Vec<_> = self
            .ratios
            .iter()
            .filter_map(|r| {
                let a = self.find(&r.section, &r.config, &r.num)?.summary();
                let b = self.find(&r.section, &r.config, &r.den)?.summary();
                Some(serde_json::json!({
                    "scenario": r.section,
                    "config": r.config,
                    "shardgate": r.num,
                    "peer": r.den,
                    "ratio": if b.median > 0.0 { a.median / b.median } else { 0.0 },
                }))
            })
            .collect();
        let doc = serde_json::json!({
            "settings": settings,
            "results": rows,
            "ratios": ratios,
            "notes": self.notes,
        });
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let text = serde_json::to_string_pretty(&doc).unwrap();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }
}
