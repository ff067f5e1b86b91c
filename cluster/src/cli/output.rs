//! Rendering results as an aligned table or as JSON.

use serde::Serialize;

use super::Format;

/// Prints `rows` under `headers` as an aligned table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    print!("{}", render_table(headers, rows));
}

/// The aligned table text.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Prints `value` as pretty JSON.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints `value` as JSON or as the table built by `rows`.
pub fn emit<T: Serialize>(
    format: Format,
    value: &T,
    headers: &[&str],
    rows: impl FnOnce(&T) -> Vec<Vec<String>>,
) -> anyhow::Result<()> {
    match format {
        Format::Json => json(value),
        Format::Table => {
            table(headers, &rows(value));
            Ok(())
        }
    }
}

/// Bytes shown as UTF-8 when they are, else as hex.
pub fn show_bytes(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_string(),
        Err(_) => format!(
            "0x{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = render_table(
            &["KEY", "V"],
            &[
                vec!["a".into(), "1".into()],
                vec!["long".into(), "22".into()],
            ],
        );
        assert_eq!(t, "KEY   V\na     1\nlong  22\n");
        assert_eq!(show_bytes(&[0xff, 0x00]), "0xff00");
    }
}
