//! `medray results` and `medray sql`: the results table of inference and read-only SQL on
//! the catalog, on a local data directory or through the head (the same rules as `medray
//! datasets`, see [`DataArgs::target`]). Both print the same either way.
//!
//! The table shows each row's `split` (whether the case was among the model's training
//! data) and ends with a summary per split, held-out cases first, so that figures on
//! training cases are never mixed into held-out ones.

use std::time::Duration;

use anyhow::Context;
use medray_core::catalog::query::{
    query_read_only, QueryLimits, QueryResult, SqlValue, LOCAL_MAX_QUERY_BYTES,
};
use medray_core::report::split_summaries;
use medray_core::results::{list_results, Column, ResultFilter, ResultRow, Split, RESULT_COLUMNS};
use medray_proto::v1::{ListResultsRequest, QueryCatalogRequest};

use crate::cluster::client::{status_error, ClientArgs, HeadClient};
use crate::data_dir::{DataArgs, Target};

/// Longest a local `medray sql` statement may run.
const LOCAL_QUERY_TIME_LIMIT: Duration = Duration::from_secs(60);

/// How rows are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// Comma-separated values with a header line (RFC 4180 quoting).
    Csv,
    /// One JSON array of objects.
    Json,
}

pub mod export;

/// What `medray results` does besides listing rows.
#[derive(Debug, clap::Subcommand)]
pub enum ResultsCommand {
    /// Write a job's displacement fields in another tool's format (Learn2Reg submission).
    Export(export::ExportArgs),
}

/// Arguments of `medray results`.
#[derive(Debug, clap::Args)]
pub struct ResultsArgs {
    #[command(subcommand)]
    command: Option<ResultsCommand>,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    client: ClientArgs,
    /// Only this model.
    #[arg(long)]
    model: Option<String>,
    /// Only this model version.
    #[arg(long)]
    version: Option<String>,
    /// Only this dataset.
    #[arg(long)]
    dataset: Option<String>,
    /// Only the rows written by this inference job.
    #[arg(long)]
    job: Option<String>,
    /// Order by this column (e.g. dice_score, tre_mm, runtime_ms).
    #[arg(long, value_name = "COLUMN")]
    order_by: Option<String>,
    /// Descending order.
    #[arg(long)]
    desc: bool,
    /// At most this many rows.
    #[arg(long)]
    limit: Option<u32>,
    /// `table` shows the main columns; `csv` and `json` every column.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

/// Arguments of `medray sql`.
#[derive(Debug, clap::Args)]
pub struct SqlArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    client: ClientArgs,
    /// One SELECT statement (or WITH ... SELECT, VALUES); anything that could write is
    /// refused.
    query: String,
    /// At most this many rows.
    #[arg(long, default_value_t = 10_000)]
    max_rows: u32,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

/// Columns `medray results` shows as a table.
const TABLE_COLUMNS: [&str; 15] = [
    "case_id",
    "dataset",
    "model_name",
    "model_version",
    "split",
    "status",
    "dice_before",
    "dice_score",
    "soft_dice",
    "ssim_score",
    "tre_before_mm",
    "tre_mm",
    "folding_pct",
    "runtime_ms",
    "error",
];

/// Results rows as a table of the given columns (a name that is not a column shows NULL).
#[must_use]
pub fn results_table(rows: &[ResultRow], columns: &[&str]) -> QueryResult {
    let found: Vec<Option<&Column>> = columns.iter().map(|c| Column::named(c)).collect();
    QueryResult {
        columns: columns.iter().map(ToString::to_string).collect(),
        rows: rows
            .iter()
            .map(|r| {
                found
                    .iter()
                    .map(|c| c.map_or(SqlValue::Null, |c| c.value(r)))
                    .collect()
            })
            .collect(),
        truncated: false,
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Formats a value for a table cell: reals with 4 decimals, NULL as empty.
fn cell(v: &SqlValue, table: bool) -> String {
    match v {
        SqlValue::Null => String::new(),
        SqlValue::Real(f) if table => format!("{f:.4}"),
        other => other.to_string(),
    }
}

fn json_value(v: &SqlValue) -> serde_json::Value {
    match v {
        SqlValue::Null => serde_json::Value::Null,
        SqlValue::Integer(i) => (*i).into(),
        SqlValue::Real(f) => {
            serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into)
        }
        SqlValue::Text(t) => t.clone().into(),
        SqlValue::Blob(b) => hex::encode(b).into(),
    }
}

/// Prints rows in `format` to a string (tables: a line per row, columns aligned).
#[must_use]
pub fn render(q: &QueryResult, format: Format) -> String {
    let mut out = String::new();
    match format {
        Format::Json => {
            let rows: Vec<serde_json::Value> = q
                .rows
                .iter()
                .map(|row| {
                    serde_json::Value::Object(
                        q.columns
                            .iter()
                            .zip(row)
                            .map(|(c, v)| (c.clone(), json_value(v)))
                            .collect(),
                    )
                })
                .collect();
            out.push_str(&serde_json::Value::Array(rows).to_string());
            out.push('\n');
        }
        Format::Csv => {
            let line = |cells: Vec<String>| {
                cells
                    .iter()
                    .map(|c| csv_field(c))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            out.push_str(&line(q.columns.clone()));
            out.push('\n');
            for row in &q.rows {
                out.push_str(&line(row.iter().map(|v| cell(v, false)).collect()));
                out.push('\n');
            }
        }
        Format::Table => {
            let cells: Vec<Vec<String>> = q
                .rows
                .iter()
                .map(|row| {
                    row.iter()
                        .map(|v| cell(v, true).replace('\n', " "))
                        .collect()
                })
                .collect();
            let widths: Vec<usize> = q
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    cells
                        .iter()
                        .map(|r| r[i].chars().count())
                        .chain([c.len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |cells: &[String]| {
                cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            out.push_str(&line(&q.columns));
            out.push('\n');
            for row in &cells {
                out.push_str(&line(row));
                out.push('\n');
            }
            out.push_str(&format!(
                "({} row{})\n",
                q.rows.len(),
                if q.rows.len() == 1 { "" } else { "s" }
            ));
        }
    }
    out
}

fn print(q: &QueryResult, format: Format) {
    print!("{}", render(q, format));
    if q.truncated {
        eprintln!("(more rows exist: raise --max-rows or add a LIMIT)");
    }
}

/// The summary lines under a results table: per split (held-out first, then validation,
/// training and unknown), the mean Dice and TRE before and after and the mean folding over
/// the succeeded cases. Rows of several models or datasets are summarised together: filter
/// with `--model`, `--version`, `--dataset` or `--job` to compare like with like.
#[must_use]
pub fn split_summary(rows: &[ResultRow]) -> String {
    let summaries = split_summaries(rows);
    if summaries.is_empty() {
        return String::new();
    }
    let mut out = String::from("means over succeeded cases, by split:\n");
    for s in &summaries {
        out.push_str("  ");
        out.push_str(&s.line());
        out.push('\n');
    }
    if !summaries.iter().any(|s| s.split == Some(Split::HeldOut)) {
        out.push_str(
            "  (no held-out case: these figures do not measure how the model generalises)\n",
        );
    }
    out
}

/// Prints results rows: a table of the main columns and the summary per split, or every
/// column as CSV or JSON.
pub fn print_results(rows: &[ResultRow], format: Format) {
    let columns: &[&str] = match format {
        Format::Table => &TABLE_COLUMNS,
        Format::Csv | Format::Json => &RESULT_COLUMNS,
    };
    print(&results_table(rows, columns), format);
    if format == Format::Table {
        print!("{}", split_summary(rows));
    }
}

/// The rows of `filter` through the head.
pub async fn remote_results(
    client: &mut HeadClient,
    filter: &ResultFilter,
) -> anyhow::Result<Vec<ResultRow>> {
    let reply = client
        .list_results(ListResultsRequest::from(filter))
        .await
        .map_err(|e| status_error("results", e))?
        .into_inner();
    reply
        .results
        .into_iter()
        .map(|r| ResultRow::try_from(r).context("the head sent an invalid results row"))
        .collect()
}

/// Runs `medray results`.
pub fn run_results(args: ResultsArgs) -> anyhow::Result<()> {
    if let Some(ResultsCommand::Export(export)) = args.command {
        return export::run(export);
    }
    let filter = ResultFilter {
        model: args.model,
        version: args.version,
        dataset: args.dataset,
        job_id: args.job,
        order_by: args.order_by,
        descending: args.desc,
        limit: args.limit.map(|l| l as usize),
    };
    filter.validate()?;
    let rows = match args.data.target(&args.client)? {
        Target::Head => {
            let rt = crate::data_dir::runtime()?;
            rt.block_on(async {
                let mut c = args.client.connect().await?;
                remote_results(&mut c, &filter).await
            })?
        }
        Target::Local => list_results(&args.data.open_catalog()?, &filter)?,
    };
    print_results(&rows, args.format);
    Ok(())
}

/// Runs `medray sql`.
pub fn run_sql(args: SqlArgs) -> anyhow::Result<()> {
    medray_core::catalog::query::check_sql_text(&args.query)?;
    let answer = match args.data.target(&args.client)? {
        Target::Head => {
            let rt = crate::data_dir::runtime()?;
            rt.block_on(async {
                let mut c = args.client.connect().await?;
                let reply = c
                    .query_catalog(QueryCatalogRequest {
                        sql: args.query.clone(),
                        max_rows: args.max_rows,
                    })
                    .await
                    .map_err(|e| status_error("sql", e))?
                    .into_inner();
                Ok::<_, anyhow::Error>(QueryResult::from(reply))
            })?
        }
        Target::Local => query_read_only(
            &args.data.dir().join("catalog.db"),
            &args.query,
            &QueryLimits {
                max_rows: args.max_rows as usize,
                max_bytes: LOCAL_MAX_QUERY_BYTES,
                time_limit: LOCAL_QUERY_TIME_LIMIT,
            },
        )?,
    };
    print(&answer, args.format);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_columns_of_the_results_table() {
        for c in TABLE_COLUMNS {
            assert!(Column::named(c).is_some(), "{c}");
        }
    }

    #[test]
    fn formats_quote_and_align() {
        let q = QueryResult {
            columns: vec!["case_id".into(), "dice".into(), "note".into()],
            rows: vec![
                vec![
                    SqlValue::Text("case_1".into()),
                    SqlValue::Real(0.5),
                    SqlValue::Text("a, \"b\"".into()),
                ],
                vec![
                    SqlValue::Text("c2".into()),
                    SqlValue::Null,
                    SqlValue::Integer(3),
                ],
            ],
            truncated: false,
        };
        assert_eq!(
            render(&q, Format::Csv),
            "case_id,dice,note\ncase_1,0.5,\"a, \"\"b\"\"\"\nc2,,3\n"
        );
        assert_eq!(
            render(&q, Format::Table),
            "case_id  dice    note\ncase_1   0.5000  a, \"b\"\nc2               3\n(2 rows)\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&render(&q, Format::Json)).expect("json");
        assert_eq!(json[0]["dice"], 0.5);
        assert_eq!(json[1]["dice"], serde_json::Value::Null);
        assert_eq!(json[1]["note"], 3);
    }

    #[test]
    fn the_summary_keeps_held_out_and_training_cases_apart() {
        use medray_core::catalog::{CaseId, DatasetName};
        use medray_core::models::ModelName;
        use medray_core::results::CaseStatus;
        let row = |case: &str, split: Option<Split>, before: f64, after: f64| {
            let mut r = ResultRow::failed(
                CaseId::new(case).expect("id"),
                DatasetName::new("d").expect("dataset"),
                ModelName::new("m").expect("model"),
                "v1".into(),
                String::new(),
                "job-1".into(),
            );
            r.status = CaseStatus::Succeeded;
            r.error = None;
            r.split = split;
            r.dice_before = Some(before);
            r.dice_score = Some(after);
            r.folding_pct = Some(0.0);
            r
        };
        let rows = [
            row("c1", Some(Split::Train), 0.5, 0.9),
            row("c2", Some(Split::Train), 0.5, 0.7),
            row("c3", Some(Split::HeldOut), 0.4, 0.6),
            row("c4", None, 0.1, 0.2),
        ];
        let table = render(&results_table(&rows, &TABLE_COLUMNS), Format::Table);
        assert!(
            table.lines().nth(3).is_some_and(|l| l.contains("held-out")),
            "{table}"
        );
        let summary = split_summary(&rows);
        let lines: Vec<&str> = summary.lines().collect();
        assert_eq!(
            lines[1..],
            [
                "  held-out: 1 case(s), Dice 0.4000 -> 0.6000, TRE n/a -> n/a mm, folding 0.000 %",
                "  training: 2 case(s), Dice 0.5000 -> 0.8000, TRE n/a -> n/a mm, folding 0.000 %",
                "  unknown split: 1 case(s), Dice 0.1000 -> 0.2000, TRE n/a -> n/a mm, folding 0.000 %",
            ],
            "{summary}"
        );
        assert!(split_summary(&rows[..2]).contains("no held-out case"));
    }
}
