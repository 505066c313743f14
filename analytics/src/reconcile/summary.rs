//! The readable outputs of a reconciliation: `daily.csv`, `summary.md` and `summary.html`,
//! rendered from the daily figures (`sql/reconcile_daily.sql`) and, for the HTML, the list of
//! discrepancies (`sql/reconcile_discrepancies.sql`).

use super::{Period, ReconcileError};
use crate::error::AnalyticsError;
use chrono::FixedOffset;
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::Int64Type;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use std::fmt::Write as _;

/// What the summaries say about the run, besides the figures.
pub(super) struct Heading<'a> {
    pub(super) vendor: &'a str,
    pub(super) period: Period,
    pub(super) offset: FixedOffset,
    /// The vendor's currency in the price table, if it has prices.
    pub(super) currency: Option<&'a str>,
    pub(super) match_window_secs: u64,
    /// Where every row with its category is: `reconciliation_rows/vendor=V/period=P/rows.parquet`.
    pub(super) rows_file: String,
}

impl Heading<'_> {
    fn title(&self) -> String {
        format!(
            "Vendor bill reconciliation: {}, {}",
            self.vendor, self.period
        )
    }

    /// The first paragraph, with `code` in backticks.
    fn intro(&self) -> String {
        let currency = self.currency.unwrap_or("the bill's currency");
        format!(
            "Days are calendar days at UTC{}. Money is in {currency}: expected is herald's \
             billing units times `reconcile.prices` for messages sent and not reported failed; \
             billed is the bill's amount, else its units times the same prices; difference is \
             billed minus expected. Pairs are made by vendor message id and receiver, else by \
             receiver within {} s.",
            self.offset, self.match_window_secs
        )
    }

    fn rows_note(&self) -> String {
        format!(
            "Every bill row and message with its category: `{}`.",
            self.rows_file
        )
    }
}

/// How the summaries label the daily columns (the others are left out of them).
const SUMMARY_COLUMNS: [(&str, &str); 14] = [
    ("herald_sends", "herald sends"),
    ("bill_rows", "bill rows"),
    ("matched", "matched"),
    ("paired_by_receiver_time", "paired by receiver + time"),
    ("billed_not_sent", "billed, not sent"),
    ("sent_not_billed", "sent, not billed"),
    ("billed_though_failed", "billed though failed"),
    ("unit_mismatch", "unit mismatch"),
    ("failed_not_billed", "failed, not billed"),
    ("herald_units", "herald units"),
    ("billed_units", "billed units"),
    ("expected_micros", "expected"),
    ("billed_micros", "billed"),
    ("difference_micros", "difference"),
];

/// What each category means, by its label.
const LEGEND: [(&str, &str); 6] = [
    ("matched", "billed as herald expects"),
    ("billed, not sent", "a bill row herald has no message for"),
    (
        "sent, not billed",
        "sent by herald and not reported failed, but not on the bill",
    ),
    (
        "billed though failed",
        "billed although herald saw the send or its receipt fail, or the bill says failed",
    ),
    (
        "unit mismatch",
        "billed for other billing units than herald counted",
    ),
    ("failed, not billed", "as expected"),
];
const PAIRED_LABEL: &str = "Paired by receiver + time";
const PAIRED_NOTE: &str =
    "counts the pairs made without a common vendor message id, in whatever category.";

/// How the HTML list of discrepancies labels its columns (`sql/reconcile_discrepancies.sql`).
const DISCREPANCY_COLUMNS: [(&str, &str); 11] = [
    ("day", "day"),
    ("category", "category"),
    ("receiver", "receiver"),
    ("vendor_message_id", "vendor message id"),
    ("bill_line", "bill line"),
    ("herald_outcome", "herald outcome"),
    ("bill_status", "bill status"),
    ("herald_units", "herald units"),
    ("billed_units", "billed units"),
    ("expected_micros", "expected"),
    ("billed_micros", "billed"),
];

/// The most discrepancies the HTML summary lists.
pub(super) const DISCREPANCIES_LISTED: usize = 200;

/// The daily figures as text cells: the day, then integers.
pub(super) struct Table {
    names: Vec<String>,
    rows: Vec<(String, Vec<i64>)>,
    totals: Vec<i64>,
}

impl Table {
    pub(super) fn of(daily: &RecordBatch) -> Result<Table, ReconcileError> {
        let bad = || AnalyticsError::Corrupt("unexpected daily report columns".into());
        let day = daily.column(0).as_string_opt::<i32>().ok_or_else(bad)?;
        let mut ints = Vec::new();
        for col in &daily.columns()[1..] {
            ints.push(col.as_primitive_opt::<Int64Type>().ok_or_else(bad)?);
        }
        let rows: Vec<(String, Vec<i64>)> = (0..daily.num_rows())
            .map(|i| {
                let values = ints.iter().map(|c| c.value(i)).collect();
                (day.value(i).to_string(), values)
            })
            .collect();
        let totals = (0..ints.len())
            .map(|c| rows.iter().map(|(_, v)| v[c]).sum())
            .collect();
        let names = daily
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        Ok(Table {
            names,
            rows,
            totals,
        })
    }

    /// `daily.csv`: the daily rows, then a `total` row.
    pub(super) fn csv(&self) -> String {
        let mut out = self.names.join(",");
        out.push('\n');
        let total = ("total".to_string(), self.totals.clone());
        for (day, values) in self.rows.iter().chain([&total]) {
            out.push_str(day);
            for v in values {
                let _ = write!(out, ",{v}");
            }
            out.push('\n');
        }
        out
    }

    /// The position among the values of the column `name`.
    fn column(&self, name: &str) -> Option<usize> {
        self.names[1..].iter().position(|n| n == name)
    }

    /// The summary's columns: position among the values, label, whether it is money.
    fn shown(&self) -> Vec<(usize, &'static str, bool)> {
        SUMMARY_COLUMNS
            .iter()
            .filter_map(|(name, label)| {
                let i = self.column(name)?;
                Some((i, *label, name.ends_with("_micros")))
            })
            .collect()
    }

    /// The daily rows and then the totals, each as its day (`None`: the totals) and cells.
    fn lines(&self) -> Vec<(Option<&str>, Vec<String>)> {
        let shown = self.shown();
        let cells = |values: &[i64]| -> Vec<String> {
            shown
                .iter()
                .map(|(i, _, is_money)| {
                    if *is_money {
                        money(values[*i])
                    } else {
                        values[*i].to_string()
                    }
                })
                .collect()
        };
        let mut lines: Vec<_> = self
            .rows
            .iter()
            .map(|(day, values)| (Some(day.as_str()), cells(values)))
            .collect();
        lines.push((None, cells(&self.totals)));
        lines
    }

    /// How many rows had no price, when some had none.
    fn unpriced(&self) -> Option<i64> {
        self.column("unpriced")
            .map(|i| self.totals[i])
            .filter(|n| *n > 0)
    }

    /// `summary.md`.
    pub(super) fn markdown(&self, h: &Heading) -> String {
        let shown = self.shown();
        let mut md = format!("# {}\n\n{}\n\n", h.title(), h.intro());
        md.push_str("| day |");
        for (_, label, _) in &shown {
            let _ = write!(md, " {label} |");
        }
        md.push_str("\n|---|");
        md.push_str(&"---:|".repeat(shown.len()));
        md.push('\n');
        for (day, cells) in self.lines() {
            let _ = write!(md, "| {} |", day.unwrap_or("**total**"));
            for cell in cells {
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        }
        let legend: Vec<String> = LEGEND
            .iter()
            .map(|(label, meaning)| format!("**{label}**: {meaning}"))
            .collect();
        let _ = writeln!(
            md,
            "\n{}. *{PAIRED_LABEL}* {PAIRED_NOTE}",
            legend.join("; ")
        );
        if let Some(n) = self.unpriced() {
            let _ = writeln!(
                md,
                "\n{n} rows had no price in `reconcile.prices`; their money is left out."
            );
        }
        let _ = writeln!(md, "\n{}", h.rows_note());
        md
    }

    /// `summary.html`: one self-contained page (no scripts, no outside resources) with the
    /// daily figures and the first [`DISCREPANCIES_LISTED`] `discrepancies`. Every value is
    /// escaped.
    pub(super) fn html(&self, h: &Heading, discrepancies: &RecordBatch) -> String {
        let title = escape(&h.title());
        let mut page = format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n\
             <p>{}</p>\n",
            inline(&h.intro())
        );
        page.push_str("<table>\n<thead><tr><th>day</th>");
        for (_, label, _) in self.shown() {
            let _ = write!(page, "<th>{}</th>", escape(label));
        }
        page.push_str("</tr></thead>\n<tbody>\n");
        for (day, cells) in self.lines() {
            match day {
                Some(day) => {
                    let _ = write!(page, "<tr><td>{}</td>", escape(day));
                }
                None => page.push_str("<tr class=\"total\"><th>total</th>"),
            }
            for cell in cells {
                let _ = write!(page, "<td class=\"n\">{}</td>", escape(&cell));
            }
            page.push_str("</tr>\n");
        }
        page.push_str("</tbody>\n</table>\n<dl>\n");
        for (label, meaning) in LEGEND {
            let _ = writeln!(page, "<dt>{label}</dt><dd>{meaning}</dd>");
        }
        let _ = writeln!(page, "<dt>{PAIRED_LABEL}</dt><dd>{PAIRED_NOTE}</dd>\n</dl>");
        if let Some(n) = self.unpriced() {
            let _ = writeln!(
                page,
                "<p>{n} rows had no price in <code>reconcile.prices</code>; their money is left \
                 out.</p>"
            );
        }
        discrepancy_list(&mut page, discrepancies);
        let _ = write!(
            page,
            "<p>{}</p>\n</body>\n</html>\n",
            inline(&h.rows_note())
        );
        page
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.25em .5em}\
th{background:#f3f3f3;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}\
tr.total td,tr.total th{font-weight:bold;border-top:2px solid #888}\
dt{font-weight:bold;float:left;clear:left;margin-right:.5em}dt::after{content:\":\"}";

/// Appends the section listing `discrepancies` (the rows of
/// `sql/reconcile_discrepancies.sql`, whose `total` column counts them all).
fn discrepancy_list(page: &mut String, discrepancies: &RecordBatch) {
    let total = discrepancies
        .column_by_name("total")
        .and_then(|c| c.as_primitive_opt::<Int64Type>())
        .filter(|c| !c.is_empty())
        .map_or(0, |c| c.value(0));
    page.push_str("<h2>Discrepancies</h2>\n");
    if total == 0 {
        page.push_str(
            "<p>None: every bill row and message is matched, or failed and not billed.</p>\n",
        );
        return;
    }
    let listed = discrepancies.num_rows();
    let _ = writeln!(
        page,
        "<p>{total} bill rows and messages are in a category that needs a look{}.</p>",
        if i64::try_from(listed).is_ok_and(|l| l < total) {
            format!("; the first {listed} are listed")
        } else {
            String::new()
        }
    );
    page.push_str("<table>\n<thead><tr>");
    let mut columns = Vec::new();
    for (name, label) in DISCREPANCY_COLUMNS {
        let _ = write!(page, "<th>{label}</th>");
        columns.extend(discrepancies.column_by_name(name).map(|c| (&**c, name)));
    }
    page.push_str("</tr></thead>\n<tbody>\n");
    let options = FormatOptions::default().with_null("");
    let formatters: Vec<Option<ArrayFormatter>> = columns
        .iter()
        .map(|(c, _)| ArrayFormatter::try_new(*c, &options).ok())
        .collect();
    for row in 0..listed {
        page.push_str("<tr>");
        for ((column, name), formatter) in columns.iter().zip(&formatters) {
            let money_cell = name
                .ends_with("_micros")
                .then(|| column.as_primitive_opt::<Int64Type>())
                .flatten();
            let cell = match money_cell {
                Some(m) if m.is_null(row) => String::new(),
                Some(m) => money(m.value(row)),
                None => formatter
                    .as_ref()
                    .map(|f| f.value(row).to_string())
                    .unwrap_or_default(),
            };
            let class = if column.data_type().is_numeric() {
                " class=\"n\""
            } else {
                ""
            };
            let _ = write!(page, "<td{class}>{}</td>", escape(&cell));
        }
        page.push_str("</tr>\n");
    }
    page.push_str("</tbody>\n</table>\n");
}

/// `text` with the characters that mean something in HTML escaped.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` escaped, with its `backticked` parts as `<code>`.
fn inline(text: &str) -> String {
    let mut out = String::new();
    for (i, part) in text.split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<code>{}</code>", escape(part));
        } else {
            out.push_str(&escape(part));
        }
    }
    out
}

/// Millionths as a decimal with at least two places: 185000 is `0.185`, -90000 `-0.09`.
pub(super) fn money(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let frac = format!("{:06}", abs % 1_000_000);
    let frac = frac.trim_end_matches('0');
    format!("{sign}{}.{frac:0<2}", abs / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_has_at_least_two_places() {
        assert_eq!(money(185_000), "0.185");
        assert_eq!(money(-90_000), "-0.09");
        assert_eq!(money(0), "0.00");
        assert_eq!(money(12_345_678), "12.345678");
    }

    #[test]
    fn html_escapes_every_special_character_and_marks_code() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(inline("a `<b>` c"), "a <code>&lt;b&gt;</code> c");
    }
}
