//! Plain-text tables, the way `kubectl get` and `kafka-consumer-groups` print them: a header
//! row, columns padded to their widest cell, two spaces between columns.

pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<const N: usize>(header: [&str; N]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let columns = self.header.len();
        let width = |i: usize| {
            std::iter::once(&self.header)
                .chain(&self.rows)
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..columns).map(width).collect();
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                if i + 1 == columns {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Bytes the way an operator reads them: 1.5 GiB, 320 MiB, 12 KiB, 512 B.
pub fn bytes(n: i64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// A duration in seconds, to the unit that fits: 850ms, 12.3s, 4m05s, 3h12m.
pub fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0}ms", s * 1000.0)
    } else if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        let s = s as u64;
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let s = s as u64;
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

pub fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_padded_to_their_widest_cell_and_lines_not_to_the_last() {
        let mut t = Table::new(["SOURCE", "LAG", "STATE"]);
        t.row(vec!["rest".into(), "1.0 KiB".into(), "streaming".into()]);
        t.row(vec!["worker".into(), "0 B".into(), "stalled".into()]);
        assert_eq!(
            t.render(),
            "SOURCE  LAG      STATE\nrest    1.0 KiB  streaming\nworker  0 B      stalled\n"
        );
    }

    #[test]
    fn sizes_and_durations_read_as_an_operator_expects() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(seconds(0.0123), "12ms");
        assert_eq!(seconds(12.34), "12.3s");
        assert_eq!(seconds(245.0), "4m05s");
        assert_eq!(seconds(11_520.0), "3h12m");
    }
}
