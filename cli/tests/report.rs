//! The inference report: every case's picture in the results stage, `medray report` writing
//! the page and the pictures, the head serving the same page, and the page rendering in
//! headless Chromium without console errors (screenshot taken). Tiny volumes as in
//! `infer.rs`.

use std::path::Path;
use std::time::Duration;

use medray_tests::web::{http_get, Chromium};
use medray_tests::{HeadOptions, TestCluster};

const BIN: &str = env!("CARGO_BIN_EXE_medray");
const LONG: Duration = Duration::from_secs(300);

/// Width, height and whether a PNG has more than one colour.
fn png_info(bytes: &[u8], what: &str) -> (u32, u32, bool) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder
        .read_info()
        .unwrap_or_else(|e| panic!("{what}: not a PNG: {e}"));
    let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
    let frame = reader.next_frame(&mut buf).expect("frame");
    let data = &buf[..frame.buffer_size()];
    let px = frame.color_type.samples();
    let first = &data[..px];
    let varied = data.chunks_exact(px).any(|p| p != first);
    (frame.width, frame.height, varied)
}

/// Renders `url` and checks the screenshot and the console.
fn render_clean(chromium: &Chromium, url: &str, shot: &Path) {
    let page = chromium
        .render(url, shot, (1400, 1800))
        .expect("Chromium renders the page");
    assert!(
        page.console.is_empty(),
        "{url}: console messages {:?}\n{}",
        page.console,
        page.log
    );
    let (w, h, varied) = png_info(&std::fs::read(shot).expect("screenshot"), "screenshot");
    assert_eq!((w, h), (1400, 1800));
    assert!(varied, "{url}: the screenshot is blank");
}

#[test]
fn the_report_is_written_served_and_renders_in_chromium() {
    // Needed before anything slow: fails at once, saying how to install it.
    let chromium = Chromium::find().expect("headless Chromium");
    // The check sees console errors: a page with one fails it.
    let probe = tempfile::tempdir().expect("tmp");
    let bad = probe.path().join("bad.html");
    std::fs::write(
        &bad,
        "<!DOCTYPE html><html><head><title>x</title><link rel=\"icon\" href=\"data:,\"></head>\
         <body><script>notDefined();</script></body></html>",
    )
    .expect("write");
    let page = chromium
        .render(
            &format!("file://{}", bad.display()),
            &probe.path().join("bad.png"),
            (400, 300),
        )
        .expect("render");
    assert!(
        page.console.iter().any(|m| m.contains("notDefined")),
        "the console check missed an uncaught error:\n{}",
        page.log
    );

    let mut c = TestCluster::start(BIN, HeadOptions::default()).expect("head starts");
    for _ in 0..2 {
        c.add_worker().expect("worker starts");
    }
    c.wait_for_workers(2, LONG).expect("workers register");
    c.cli_ok(&[
        "ingest",
        "synthetic",
        "--name",
        "lungs",
        "--cases",
        "3",
        "--size",
        "24",
        "20",
        "16",
        "--seed",
        "5",
    ])
    .expect("ingest");
    let train_job = c.train_tiny_model("lungs", "m", LONG).expect("training");
    let job = c
        .cli_ok(&["infer", "--no-wait", "--dataset", "lungs", "--model", "m"])
        .expect("submit")
        .trim()
        .to_string();
    let j = c.wait_for_job_end(&job, LONG).expect("job ends");
    assert_eq!(j["state"], "SUCCEEDED", "{j}");
    let cases = ["case_001", "case_002", "case_003"];

    // A picture per case in the results stage, next to the images.
    let listing = c
        .cli_ok(&["stage", "ls", "results/lungs/m/v1"])
        .expect("stage ls");
    for case in cases {
        assert!(
            listing.contains(&format!("results/lungs/m/v1/{case}_overview.png")),
            "{case}: no picture in\n{listing}"
        );
    }

    // `medray report` writes the page and the pictures.
    let out = c.dir().join("report");
    let printed = c
        .cli_ok(&["report", "--job", &job, "--out", &out.display().to_string()])
        .expect("report");
    assert!(
        printed.contains("3 case(s) (0 failed), 3 picture(s)"),
        "{printed}"
    );
    let html = std::fs::read_to_string(out.join("index.html")).expect("index.html");
    for case in cases {
        assert!(
            html.contains(&format!("src=\"cases/{case}.png\"")),
            "{case}"
        );
        let png = std::fs::read(out.join("cases").join(format!("{case}.png"))).expect("picture");
        let (w, h, varied) = png_info(&png, case);
        assert!(w > 600 && h > 200 && varied, "{case}: {w}x{h}");
    }
    // Every case trained the model (`train_tiny_model`: no validation, nothing held out):
    // the page says so, and shows them as training cases.
    assert!(html.contains("Training cases (3)"), "no training section");
    assert!(
        html.contains("id=\"no-held-out\""),
        "no warning that nothing is held out"
    );
    assert!(!html.contains("id=\"held-out\""));
    assert!(printed.contains("training: 3 case(s)"), "{printed}");
    for heading in [
        "Summary over succeeded cases",
        "Dice after",
        "TRE after (mm)",
        "SSIM",
    ] {
        assert!(html.contains(heading), "no `{heading}` in the page");
    }
    // SD log J (issue 19) has a summary row over the 3 cases, and a per-case column.
    assert!(
        html.contains("<tr><td class=\"t\">SD log J</td><td>3</td>"),
        "no SD log J summary row"
    );
    assert!(html.contains("<th>SD log J</th>"));
    assert!(html.contains(&job));

    // The pages show patient images: without a signed link the head refuses them
    // (issue 18 item 2; they used to answer anyone who reached the port).
    for path in [
        format!("/jobs/{job}/report/"),
        format!("/jobs/{job}/report/cases/case_002.png"),
        "/jobs".to_string(),
    ] {
        let answer = http_get(&c.http, &path).expect("GET");
        assert_eq!(answer.status, 401, "{path}: {}", answer.text());
        assert!(answer.text().contains("--link"), "{}", answer.text());
    }
    let link = |job: &str| {
        c.cli_ok(&["report", "--job", job, "--link"])
            .expect("link")
            .trim()
            .to_string()
    };
    let page_link = link(&job);
    let query = page_link.split_once('?').expect("a query").1.to_string();
    // A link for another job, or a forged one, opens nothing.
    let other = link("job-999998");
    let forged = format!(
        "/jobs/{job}/report/?{}",
        other.split_once('?').expect("query").1
    );
    assert_eq!(http_get(&c.http, &forged).expect("GET").status, 401);

    // With the link the head serves the same page, and sets the cookie its pictures need.
    let served = http_get(&c.http, &page_link).expect("GET report");
    assert_eq!(served.status, 200, "{}", served.text());
    assert_eq!(
        served.text(),
        html,
        "the served page differs from the written one"
    );
    let cookie = served.header("set-cookie").expect("a cookie").to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        cookie.contains(&format!("Path=/jobs/{job}/report/")),
        "{cookie}"
    );
    let picture = http_get(
        &c.http,
        &format!("/jobs/{job}/report/cases/case_002.png?{query}"),
    )
    .expect("GET picture");
    assert_eq!(picture.status, 200);
    assert_eq!(picture.header("content-type"), Some("image/png"));
    assert_eq!(
        picture.body,
        std::fs::read(out.join("cases/case_002.png")).expect("picture")
    );
    let redirect = http_get(&c.http, &format!("/jobs/{job}/report?{query}")).expect("GET");
    assert_eq!(redirect.status, 308);
    assert_eq!(
        http_get(&c.http, &link("job-999999")).expect("GET").status,
        404
    );
    assert_eq!(
        http_get(
            &c.http,
            &format!("/jobs/{job}/report/cases/..%2Fcatalog.db?{query}")
        )
        .expect("GET")
        .status,
        404
    );
    let answer = http_get(&c.http, &link(&train_job)).expect("GET");
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert!(
        answer.text().contains("inference jobs"),
        "{}",
        answer.text()
    );
    let index_link = c
        .cli_ok(&["report", "--index-link"])
        .expect("index link")
        .trim()
        .to_string();
    let index = http_get(&c.http, &index_link).expect("GET /jobs");
    assert_eq!(index.status, 200, "{}", index.text());
    assert!(index.text().contains(&format!("/jobs/{job}/report/?exp=")));

    // Both render in headless Chromium, with every picture, and no console message.
    render_clean(
        &chromium,
        &format!("file://{}", out.join("index.html").display()),
        &c.dir().join("report-file.png"),
    );
    // Served: the signed link opens the page, and its cookie loads every picture.
    render_clean(
        &chromium,
        &format!("http://{}{page_link}", c.http),
        &c.dir().join("report-served.png"),
    );
}
