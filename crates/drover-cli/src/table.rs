//! Plain column-aligned tables, kubectl style: easy to read and to `grep`/`awk`.

/// Formats rows under a header, each column as wide as its widest cell.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// A Unix-milliseconds time as "12s ago", "5m ago", "3h ago", "2d ago" (or "never").
pub fn ago(ms: Option<i64>, now_ms: i64) -> String {
    let Some(ms) = ms else {
        return "never".into();
    };
    let s = (now_ms - ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let out = render(
            &["ID", "STATUS"],
            &[
                vec!["abc".into(), "accepted".into()],
                vec!["a".into(), "-".into()],
            ],
        );
        assert_eq!(out, "ID   STATUS\nabc  accepted\na    -\n");
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(ago(None, 0), "never");
        assert_eq!(ago(Some(0), 5_000), "5s ago");
        assert_eq!(ago(Some(0), 7_200_000), "2h ago");
    }
}
