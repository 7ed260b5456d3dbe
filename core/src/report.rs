//! The inference report: one self-contained HTML page per inference job with the job's
//! settings, summary statistics of every metric, the per-case table and each case's
//! picture. `medray report --job ID --out DIR` writes it with the pictures beside it; the
//! head serves the same page at `/jobs/<job>/report/`.
//!
//! Cases are shown in groups by their `split` ([`Split`]): held-out cases first, then
//! validation cases, then the cases the model was trained on, then those whose split is
//! unknown, each group with its own statistics, so that figures on training data are never
//! mixed into held-out ones ([`split_groups`], [`split_summaries`]).
//!
//! The page links each picture as `cases/<case>.png` (relative, see [`picture_name`]); the
//! writer of the page puts the pictures there.

use std::fmt::Write as _;

use crate::results::{CaseStatus, ResultRow, Role, Split, COLUMNS, IMAGE_SUFFIX, PNG_SUFFIX};

/// What the report says about the job itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReportJob {
    /// Job id.
    pub id: String,
    /// Its state (`SUCCEEDED`, `RUNNING`, ...).
    pub state: String,
    /// Why it is pending, failed or cancelled; empty otherwise.
    pub reason: String,
    /// Dataset, model and version the job registered.
    pub dataset: String,
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// Adam steps of instance optimisation per case.
    pub refine_steps: u32,
    /// RFC 3339 timestamps; empty when not reached.
    pub created_at: String,
    /// See `created_at`.
    pub finished_at: String,
}

/// Summary statistics of one metric over the succeeded cases that have it.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricSummary {
    /// Column of the results table.
    pub column: &'static str,
    /// Heading shown in the page.
    pub label: &'static str,
    /// Cases with a value.
    pub n: usize,
    /// Mean, sample standard deviation (0 for one case), median, minimum and maximum.
    pub mean: f64,
    /// See `mean`.
    pub std: f64,
    /// See `mean`.
    pub median: f64,
    /// See `mean`.
    pub min: f64,
    /// See `mean`.
    pub max: f64,
}

/// Summary statistics of every metric that at least one succeeded case has, in the order
/// of the results table. Failed cases and missing values (no masks, no keypoints) are left
/// out of the statistics, never counted as zero.
#[must_use]
pub fn summarize(rows: &[ResultRow]) -> Vec<MetricSummary> {
    let ok: Vec<&ResultRow> = rows
        .iter()
        .filter(|r| r.status == CaseStatus::Succeeded)
        .collect();
    COLUMNS
        .iter()
        .filter_map(|c| {
            let Role::Metric(label) = c.role else {
                return None;
            };
            let mut v: Vec<f64> = ok
                .iter()
                .filter_map(|r| (c.get)(r).real())
                .filter(|x| x.is_finite())
                .collect();
            if v.is_empty() {
                return None;
            }
            v.sort_by(f64::total_cmp);
            let n = v.len();
            let mean = v.iter().sum::<f64>() / n as f64;
            let std = if n > 1 {
                (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
            } else {
                0.0
            };
            let median = if n % 2 == 1 {
                v[n / 2]
            } else {
                0.5 * (v[n / 2 - 1] + v[n / 2])
            };
            Some(MetricSummary {
                column: c.name,
                label,
                n,
                mean,
                std,
                median,
                min: v[0],
                max: v[n - 1],
            })
        })
        .collect()
}

/// The groups of a report, in the order shown: held-out, validation, train, unknown (`None`).
pub const GROUPS: [Option<Split>; 4] = [
    Some(Split::HeldOut),
    Some(Split::Validation),
    Some(Split::Train),
    None,
];

/// Heading of a group of cases.
#[must_use]
pub fn group_label(split: Option<Split>) -> &'static str {
    match split {
        Some(Split::HeldOut) => "held-out",
        Some(Split::Validation) => "validation",
        Some(Split::Train) => "training",
        None => "unknown split",
    }
}

/// What a group of cases means, for readers of the report.
fn group_note(split: Option<Split>) -> &'static str {
    match split {
        Some(Split::HeldOut) => {
            "Neither image of these cases was used to train the model or to select its weights: \
             these figures measure how it generalises."
        }
        Some(Split::Validation) => {
            "Not trained on, but used to select the model's best epoch: slightly optimistic."
        }
        Some(Split::Train) => {
            "The model was trained on these cases: their figures overstate its quality."
        }
        None => {
            "The model records no training data (e.g. imported weights): these cases may or \
                 may not have been trained on."
        }
    }
}

/// The rows of each group present, in [`GROUPS`] order (rows keep their order).
#[must_use]
pub fn split_groups(rows: &[ResultRow]) -> Vec<(Option<Split>, Vec<&ResultRow>)> {
    GROUPS
        .iter()
        .map(|&g| (g, rows.iter().filter(|r| r.split == g).collect::<Vec<_>>()))
        .filter(|(_, rows)| !rows.is_empty())
        .collect()
}

/// The headline figures of one group of cases: means over its succeeded cases that have
/// the value (`None` when none has it).
#[derive(Clone, Debug, PartialEq)]
pub struct SplitSummary {
    /// The group.
    pub split: Option<Split>,
    /// Its cases.
    pub cases: usize,
    /// Its succeeded cases.
    pub succeeded: usize,
    /// Mean binary Dice before registration.
    pub dice_before: Option<f64>,
    /// Mean binary Dice after.
    pub dice: Option<f64>,
    /// Mean TRE before, mm.
    pub tre_before_mm: Option<f64>,
    /// Mean TRE after, mm.
    pub tre_mm: Option<f64>,
    /// Mean folding, % of voxels.
    pub folding_pct: Option<f64>,
}

impl SplitSummary {
    /// One line: `held-out: 3 case(s), Dice 0.61 -> 0.80, TRE 4.1 -> 2.0 mm, folding 0.00 %`.
    #[must_use]
    pub fn line(&self) -> String {
        let f = |v: Option<f64>, d: usize| v.map_or_else(|| "n/a".into(), |v| format!("{v:.d$}"));
        let failed = self.cases - self.succeeded;
        format!(
            "{}: {} case(s){}, Dice {} -> {}, TRE {} -> {} mm, folding {} %",
            group_label(self.split),
            self.cases,
            if failed > 0 {
                format!(" ({failed} failed)")
            } else {
                String::new()
            },
            f(self.dice_before, 4),
            f(self.dice, 4),
            f(self.tre_before_mm, 2),
            f(self.tre_mm, 2),
            f(self.folding_pct, 3),
        )
    }
}

/// The headline figures of every group present, in [`GROUPS`] order.
#[must_use]
pub fn split_summaries(rows: &[ResultRow]) -> Vec<SplitSummary> {
    split_groups(rows)
        .into_iter()
        .map(|(split, group)| {
            let ok: Vec<&ResultRow> = group
                .iter()
                .copied()
                .filter(|r| r.status == CaseStatus::Succeeded)
                .collect();
            let mean = |get: fn(&ResultRow) -> Option<f64>| {
                let v: Vec<f64> = ok
                    .iter()
                    .filter_map(|r| get(r))
                    .filter(|x| x.is_finite())
                    .collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            };
            SplitSummary {
                split,
                cases: group.len(),
                succeeded: ok.len(),
                dice_before: mean(|r| r.dice_before),
                dice: mean(|r| r.dice_score),
                tre_before_mm: mean(|r| r.tre_before_mm),
                tre_mm: mean(|r| r.tre_mm),
                folding_pct: mean(|r| r.folding_pct),
            }
        })
        .collect()
}

/// Stage key of a case's picture, next to its registered image; `None` for a case without
/// outputs (failed).
#[must_use]
pub fn picture_key(row: &ResultRow) -> Option<String> {
    let image = row.output_image.as_deref()?;
    let prefix = image.strip_suffix(IMAGE_SUFFIX)?;
    Some(format!("{prefix}{PNG_SUFFIX}"))
}

/// File name of a case's picture in the report folder's `cases/` (case ids are validated
/// identifiers, safe as file names).
#[must_use]
pub fn picture_name(row: &ResultRow) -> String {
    format!("{}.png", row.case_id)
}

/// A report ready to write or serve: the page and the pictures it links.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportPlan {
    /// The page.
    pub html: String,
    /// For each picture: its file name in `cases/` and its stage key.
    pub pictures: Vec<(String, String)>,
}

/// The page for `rows` of `job` and the pictures to put beside it; `exists` says whether
/// a stage key is present (a picture missing from the stage is left out of the page).
#[must_use]
pub fn plan(job: &ReportJob, rows: &[ResultRow], exists: &dyn Fn(&str) -> bool) -> ReportPlan {
    let pictures: Vec<(String, String)> = rows
        .iter()
        .filter_map(|r| picture_key(r).map(|k| (picture_name(r), k)))
        .filter(|(_, k)| exists(k))
        .collect();
    let html = render_html(job, rows, &|r| {
        pictures.iter().any(|(n, _)| *n == picture_name(r))
    });
    ReportPlan { html, pictures }
}

/// Escapes text for HTML element content and attribute values.
#[must_use]
pub fn escape(text: &str) -> String {
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

fn num(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "&ndash;".into(),
    }
}

/// Sort key of a table cell (numbers sort as numbers; a missing value sorts last).
fn sort_key(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x}"),
        _ => String::new(),
    }
}

const STYLE: &str = "
body { font-family: system-ui, sans-serif; margin: 2em; color: #1d1d1f; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
td.e { white-space: normal; }
th { background: #f2f2f2; cursor: pointer; } td.t, th.t { text-align: left; }
tr.failed td { background: #fde8e8; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: 600; } dd { margin: 0; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; margin-bottom: 0.3em; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
";

/// Click a heading to sort the case table by that column (again: reverse).
const SORT_SCRIPT: &str = "
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var up = th.dataset.dir !== 'asc';
    th.dataset.dir = up ? 'asc' : 'desc';
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      if (x === '' || y === '') { return x === y ? 0 : (x === '' ? 1 : -1); }
      var nx = Number(x), ny = Number(y);
      var c = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny;
      return up ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
";

/// The statistics of `rows` as a table with id `summary-<id>`.
fn summary_table(h: &mut String, rows: &[ResultRow], id: &str) {
    h.push_str("<h3>Summary over succeeded cases</h3>\n");
    let summary = summarize(rows);
    if summary.is_empty() {
        h.push_str("<p>No case succeeded: there is nothing to summarise.</p>\n");
        return;
    }
    let _ = write!(
        h,
        "<table id=\"summary-{id}\">\n<thead><tr><th class=\"t\">metric</th><th>n</th>\
         <th>mean</th><th>std</th><th>median</th><th>min</th><th>max</th></tr></thead>\n<tbody>\n",
    );
    for s in &summary {
        let _ = writeln!(
            h,
            "<tr><td class=\"t\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(s.label),
            s.n,
            num(Some(s.mean), 4),
            num(Some(s.std), 4),
            num(Some(s.median), 4),
            num(Some(s.min), 4),
            num(Some(s.max), 4),
        );
    }
    h.push_str("</tbody>\n</table>\n");
}

/// The per-case table of `rows`, sortable, with id `cases-<id>`.
fn cases_table(h: &mut String, rows: &[ResultRow], id: &str) {
    let _ = write!(
        h,
        "<h3>Cases</h3>\n<p>Click a column heading to sort.</p>\n<table id=\"cases-{id}\" class=\"sortable\">\n<thead><tr>\
         <th class=\"t\">case</th><th class=\"t\">status</th><th>Dice before</th><th>Dice after</th>\
         <th>soft Dice</th><th>SSIM</th><th>MI</th><th>TRE before (mm)</th><th>TRE after (mm)</th>\
         <th>folding (%)</th><th>|DDF|</th><th>SD log J</th><th>runtime (ms)</th><th class=\"t\">device</th>\
         <th class=\"t\">worker</th><th class=\"t\">error</th></tr></thead>\n<tbody>\n",
    );
    for r in rows {
        let failed = r.status == CaseStatus::Failed;
        let _ = write!(
            h,
            "<tr{}><td class=\"t\" data-v=\"{}\">{}</td><td class=\"t\" data-v=\"{}\">{}</td>",
            if failed { " class=\"failed\"" } else { "" },
            escape(r.case_id.as_str()),
            escape(r.case_id.as_str()),
            r.status.as_str(),
            r.status.as_str(),
        );
        for (v, digits) in [
            (r.dice_before, 4),
            (r.dice_score, 4),
            (r.soft_dice, 4),
            (r.ssim_score, 4),
            (r.mi, 4),
            (r.tre_before_mm, 3),
            (r.tre_mm, 3),
            (r.folding_pct, 3),
            (r.ddf_magnitude, 3),
            (r.log_jac_std, 4),
            (r.runtime_ms, 0),
        ] {
            let _ = write!(h, "<td data-v=\"{}\">{}</td>", sort_key(v), num(v, digits));
        }
        let error = r.error.as_deref().unwrap_or("");
        let _ = writeln!(
            h,
            "<td class=\"t\" data-v=\"{}\">{}</td><td class=\"t\" data-v=\"{}\">{}</td><td class=\"t e\" data-v=\"{}\">{}</td></tr>",
            escape(&r.device),
            escape(&r.device),
            escape(&r.worker),
            escape(&r.worker),
            escape(error),
            escape(error),
        );
    }
    h.push_str("</tbody>\n</table>\n");
}

/// The report page. `has_picture` says whether a case's picture is in `cases/` (a case
/// whose picture could not be read is shown without one).
#[must_use]
pub fn render_html(
    job: &ReportJob,
    rows: &[ResultRow],
    has_picture: &dyn Fn(&ResultRow) -> bool,
) -> String {
    let succeeded = rows
        .iter()
        .filter(|r| r.status == CaseStatus::Succeeded)
        .count();
    let failed = rows.len() - succeeded;
    let mut h = String::new();
    let title = format!("medray report: {} ({} {})", job.id, job.model, job.version);
    // Writing into a String cannot fail.
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<link rel=\"icon\" href=\"data:,\">\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>{}</h1>\n<dl>\n",
        escape(&title),
        escape(&title)
    );
    let facts = [
        ("job", job.id.clone()),
        ("state", job.state.clone()),
        ("reason", job.reason.clone()),
        ("dataset", job.dataset.clone()),
        ("model", format!("{} version {}", job.model, job.version)),
        ("refine steps", job.refine_steps.to_string()),
        ("submitted", job.created_at.clone()),
        ("finished", job.finished_at.clone()),
        (
            "cases",
            format!("{} ({succeeded} succeeded, {failed} failed)", rows.len()),
        ),
    ];
    for (k, v) in facts.iter().filter(|(_, v)| !v.is_empty()) {
        let _ = writeln!(h, "<dt>{}</dt><dd>{}</dd>", escape(k), escape(v));
    }
    let groups = split_groups(rows);
    let counts: Vec<String> = groups
        .iter()
        .map(|(split, g)| format!("{} {}", g.len(), group_label(*split)))
        .collect();
    let _ = writeln!(h, "<dt>splits</dt><dd>{}</dd>", escape(&counts.join(", ")));
    h.push_str("</dl>\n");
    if !groups.iter().any(|(s, _)| *s == Some(Split::HeldOut)) {
        h.push_str(
            "<p id=\"no-held-out\"><strong>No held-out case:</strong> every case of this job was \
             used to train or select the model, or its split is unknown; these figures do not \
             measure how the model generalises.</p>\n",
        );
    }
    for (split, group) in &groups {
        let (id, heading) = match split {
            Some(Split::HeldOut) => ("held-out", "Held-out cases"),
            Some(Split::Validation) => ("validation", "Validation cases"),
            Some(Split::Train) => ("training", "Training cases"),
            None => ("unknown", "Cases of unknown split"),
        };
        let _ = writeln!(
            h,
            "<h2 id=\"{id}\">{heading} ({})</h2>\n<p>{}</p>",
            group.len(),
            escape(group_note(*split)),
        );
        let owned: Vec<ResultRow> = group.iter().map(|r| (*r).clone()).collect();
        summary_table(&mut h, &owned, id);
        cases_table(&mut h, &owned, id);
    }

    h.push_str(
        "<h2>Images</h2>\n<p>Mid coronal (top) and axial (bottom) slices on the original grid: \
         fixed, moving, warped, a checkerboard of fixed and warped, |moving - fixed|, \
         |warped - fixed| and the displacement magnitude (mm).</p>\n",
    );
    let mut pictures = 0;
    for r in groups
        .iter()
        .flat_map(|(_, g)| g.iter())
        .filter(|r| has_picture(r))
    {
        pictures += 1;
        let _ = writeln!(
            h,
            "<figure id=\"case-{}\"><figcaption>{} ({}): Dice {} &rarr; {}, TRE {} &rarr; {} mm</figcaption>\
             <img src=\"cases/{}\" alt=\"mid slices of {}\" loading=\"lazy\"></figure>",
            escape(r.case_id.as_str()),
            escape(r.case_id.as_str()),
            group_label(r.split),
            num(r.dice_before, 4),
            num(r.dice_score, 4),
            num(r.tre_before_mm, 2),
            num(r.tre_mm, 2),
            escape(&picture_name(r)),
            escape(r.case_id.as_str()),
        );
    }
    if pictures == 0 {
        h.push_str("<p>No case has a picture.</p>\n");
    }
    let _ = write!(h, "<script>{SORT_SCRIPT}</script>\n</body>\n</html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{CaseId, DatasetName};
    use crate::models::ModelName;

    fn row(case: &str, dice: Option<f64>, tre: Option<f64>) -> ResultRow {
        let mut r = ResultRow::failed(
            CaseId::new(case).expect("case id"),
            DatasetName::new("ds").expect("dataset"),
            ModelName::new("m").expect("model"),
            "1".into(),
            String::new(),
            "job-000001".into(),
        );
        r.status = CaseStatus::Succeeded;
        r.error = None;
        r.dice_score = dice;
        r.tre_mm = tre;
        r.output_image = Some(format!("results/m/1/{case}{IMAGE_SUFFIX}"));
        r
    }

    #[test]
    fn statistics_skip_failed_cases_and_missing_values() {
        let mut bad = row("c3", Some(0.0), Some(100.0));
        bad.status = CaseStatus::Failed;
        let rows = [
            row("c1", Some(0.8), Some(2.0)),
            row("c2", Some(0.9), None),
            row("c4", Some(1.0), Some(4.0)),
            bad,
        ];
        let s = summarize(&rows);
        let dice = s.iter().find(|m| m.column == "dice_score").expect("dice");
        assert_eq!(dice.n, 3);
        assert!((dice.mean - 0.9).abs() < 1e-12);
        assert!((dice.median - 0.9).abs() < 1e-12);
        assert!((dice.std - 0.1).abs() < 1e-12);
        assert_eq!((dice.min, dice.max), (0.8, 1.0));
        let tre = s.iter().find(|m| m.column == "tre_mm").expect("tre");
        assert_eq!(tre.n, 2);
        assert!((tre.median - 3.0).abs() < 1e-12);
        // No case has SSIM: no line for it.
        assert!(s.iter().all(|m| m.column != "ssim_score"));
    }

    #[test]
    fn the_page_escapes_text_and_links_pictures_of_cases_that_have_one() {
        let mut failed = row("c2", None, None);
        failed.status = CaseStatus::Failed;
        failed.output_image = None;
        failed.error = Some("reading <stage> \"x\" & y".into());
        let mut held_out = row("c1", Some(0.9), Some(1.5));
        held_out.split = Some(Split::HeldOut);
        failed.split = Some(Split::Train);
        let rows = [held_out, failed];
        let job = ReportJob {
            id: "job-000001".into(),
            state: "SUCCEEDED".into(),
            model: "m".into(),
            version: "1".into(),
            ..ReportJob::default()
        };
        let html = render_html(&job, &rows, &|r| picture_key(r).is_some());
        assert!(html.contains("reading &lt;stage&gt; &quot;x&quot; &amp; y"));
        assert!(!html.contains("<stage>"));
        assert!(html.contains("src=\"cases/c1.png\""));
        assert!(!html.contains("cases/c2.png"));
        assert!(html.contains("2 (1 succeeded, 1 failed)"));
        // Held-out and training cases in their own sections, held-out first, each with its
        // own statistics and table.
        let at = |needle: &str| html.find(needle).unwrap_or_else(|| panic!("no {needle}"));
        assert!(at("id=\"held-out\"") < at("id=\"training\""));
        assert!(at("id=\"summary-held-out\"") < at("id=\"cases-held-out\""));
        assert!(at("id=\"cases-held-out\"") < at("id=\"training\""));
        assert!(html[at("id=\"training\"")..].contains("c2"));
        assert!(!html[at("id=\"cases-held-out\"")..at("id=\"training\"")].contains(">c2<"));
        assert!(!html.contains("no-held-out"));
        let training_only = render_html(&job, &rows[1..], &|_| false);
        assert!(training_only.contains("id=\"no-held-out\""));
        let s = split_summaries(&rows);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].split, s[0].cases, s[0].dice),
            (Some(Split::HeldOut), 1, Some(0.9))
        );
        assert_eq!(
            (s[1].split, s[1].succeeded, s[1].dice),
            (Some(Split::Train), 0, None)
        );
        assert_eq!(
            picture_key(&rows[0]).as_deref(),
            Some("results/m/1/c1_overview.png")
        );
        assert_eq!(picture_key(&rows[1]), None);
    }
}
