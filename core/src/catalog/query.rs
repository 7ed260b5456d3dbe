//! Read-only SQL on the catalog (`medray sql`): one statement that reads, on a connection
//! that cannot write.
//!
//! Four guards, each sufficient against a plain write: the statement must start with
//! `SELECT`, `WITH` or `VALUES` (after comments); it must be a single statement (rusqlite's
//! `prepare` refuses a second one); SQLite must judge it read-only
//! (`sqlite3_stmt_readonly`, which catches `WITH ... DELETE`); and the database is opened
//! `SQLITE_OPEN_READ_ONLY` with `PRAGMA query_only`. `ATTACH` and `PRAGMA` never pass the
//! first guard (SQLite counts `ATTACH` as read-only, so the keyword check is what refuses
//! it). A watchdog interrupts a query that runs past its time limit, and at most
//! `max_rows` rows are returned. The answer is bounded in bytes too ([`QueryLimits`]):
//! SQLite refuses to make any one value longer than the cap (`SQLITE_LIMIT_LENGTH`, so
//! `zeroblob(1e9)` fails before it allocates), and a query whose rows add up to more than
//! the cap is stopped with an error naming it.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Longest SQL text accepted, bytes.
pub const MAX_SQL_BYTES: usize = 100_000;

/// Default byte cap of one query's answer through the head (`--max-query-bytes`; the answer
/// is one gRPC message, 8 MiB at most by default).
pub const DEFAULT_MAX_QUERY_BYTES: usize = 4 << 20;

/// Byte cap of a query on a local data directory (`medray sql --data-dir`: no message
/// limit, the caller's own memory).
pub const LOCAL_MAX_QUERY_BYTES: usize = 256 << 20;

/// Bytes a value counts for beyond its text or blob (so that many small values add up).
const VALUE_OVERHEAD: usize = 8;

/// How much one query may return and how long it may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueryLimits {
    /// Rows at most (more: the answer is cut and says so).
    pub max_rows: usize,
    /// Bytes of values at most (more: the query is refused).
    pub max_bytes: usize,
    /// Longest run (longer: the query is interrupted).
    pub time_limit: Duration,
}

/// The statements a read-only query may start with.
const READ_KEYWORDS: [&str; 3] = ["SELECT", "WITH", "VALUES"];

/// One value of a result row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SqlValue {
    /// SQL NULL.
    Null,
    /// An integer.
    Integer(i64),
    /// A floating-point number.
    Real(f64),
    /// Text.
    Text(String),
    /// A blob, shown as hex.
    Blob(Vec<u8>),
}

impl std::fmt::Display for SqlValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SqlValue::Null => f.write_str("NULL"),
            SqlValue::Integer(v) => write!(f, "{v}"),
            SqlValue::Real(v) => write!(f, "{v}"),
            SqlValue::Text(v) => f.write_str(v),
            SqlValue::Blob(v) => write!(f, "x'{}'", hex::encode(v)),
        }
    }
}

/// The rows of a query.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueryResult {
    /// Column names, in order.
    pub columns: Vec<String>,
    /// Rows, each with one value per column.
    pub rows: Vec<Vec<SqlValue>>,
    /// True when more rows existed than `max_rows`.
    pub truncated: bool,
}

/// The first keyword of `sql`, upper-cased, after whitespace and comments.
fn first_keyword(sql: &str) -> String {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map_or("", |(_, tail)| tail);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.split_once("*/").map_or("", |(_, tail)| tail);
        } else {
            break;
        }
    }
    rest.chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase()
}

fn refused(reason: impl Into<String>) -> Error {
    Error::invalid("sql", reason)
}

/// Checks the text of a query before SQLite sees it: not empty, not too long, starting with
/// a reading keyword.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `sql` and the reason.
pub fn check_sql_text(sql: &str) -> Result<()> {
    if sql.len() > MAX_SQL_BYTES {
        return Err(refused(format!(
            "{} bytes: at most {MAX_SQL_BYTES}",
            sql.len()
        )));
    }
    let keyword = first_keyword(sql);
    if keyword.is_empty() {
        return Err(refused("empty: give one SELECT statement"));
    }
    if !READ_KEYWORDS.contains(&keyword.as_str()) {
        return Err(refused(format!(
            "`{keyword}` statements are refused: the catalog is read-only here; give one SELECT (or WITH ... SELECT, VALUES) statement"
        )));
    }
    Ok(())
}

/// Runs one read-only statement on the catalog database at `path` within `limits`.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `sql` for a refused or invalid statement, one that ran
/// too long or one whose answer passes the byte cap; [`Error::Catalog`] if the database
/// cannot be opened.
pub fn query_read_only(path: &Path, sql: &str, limits: &QueryLimits) -> Result<QueryResult> {
    check_sql_text(sql)?;
    if !path.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no catalog database here"),
        ));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| Error::catalog("open read-only", e))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(|e| Error::catalog("busy timeout", e))?;
    conn.pragma_update(None, "query_only", true)
        .map_err(|e| Error::catalog("set query_only", e))?;
    // No value longer than the whole answer may be: SQLite refuses to build it.
    let longest = i32::try_from(limits.max_bytes.max(1)).unwrap_or(i32::MAX);
    conn.set_limit(rusqlite::limits::Limit::SQLITE_LIMIT_LENGTH, longest)
        .map_err(|e| Error::catalog("set the length limit", e))?;
    run(&conn, sql, limits)
}

fn run(conn: &Connection, sql: &str, limits: &QueryLimits) -> Result<QueryResult> {
    let QueryLimits {
        max_rows,
        max_bytes,
        time_limit,
    } = *limits;
    let too_big = || {
        refused(format!(
            "the answer passes the cap of {max_bytes} bytes (the head's --max-query-bytes): select fewer rows or smaller values"
        ))
    };
    let mut stmt = conn.prepare(sql).map_err(|e| match e {
        rusqlite::Error::MultipleStatement => refused("give exactly one statement"),
        other => refused(other.to_string()),
    })?;
    if !stmt.readonly() {
        return Err(refused(
            "the statement would write: the catalog is read-only here",
        ));
    }
    let columns: Vec<String> = stmt.column_names().map(ToString::to_string).collect();
    let (done, watch) = std::sync::mpsc::channel::<()>();
    let interrupt = conn.get_interrupt_handle();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watch.recv_timeout(time_limit) {
            interrupt.interrupt();
        }
    });
    let result = (|| {
        let mut rows = stmt.query([])?;
        let mut out = QueryResult {
            columns: columns.clone(),
            ..QueryResult::default()
        };
        let mut bytes = 0usize;
        while let Some(row) = rows.next()? {
            if out.rows.len() == max_rows {
                out.truncated = true;
                break;
            }
            let mut values = Vec::with_capacity(columns.len());
            for i in 0..columns.len() {
                use rusqlite::types::ValueRef;
                let value = row.get_ref(i)?;
                bytes += VALUE_OVERHEAD
                    + match value {
                        ValueRef::Text(t) | ValueRef::Blob(t) => t.len(),
                        _ => 0,
                    };
                if bytes > max_bytes {
                    return Ok(None);
                }
                values.push(match value {
                    ValueRef::Null => SqlValue::Null,
                    ValueRef::Integer(v) => SqlValue::Integer(v),
                    ValueRef::Real(v) => SqlValue::Real(v),
                    ValueRef::Text(t) => SqlValue::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => SqlValue::Blob(b.to_vec()),
                });
            }
            out.rows.push(values);
        }
        Ok::<_, rusqlite::Error>(Some(out))
    })();
    let _ = done.send(());
    let _ = watchdog.join();
    match result {
        Ok(Some(out)) => Ok(out),
        Ok(None) => Err(too_big()),
        Err(rusqlite::Error::SqliteFailure(f, _))
            if f.code == rusqlite::ErrorCode::OperationInterrupted =>
        {
            Err(refused(format!(
                "the query ran past {:.0} s and was stopped",
                time_limit.as_secs_f64()
            )))
        }
        Err(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::TooBig => {
            Err(too_big())
        }
        Err(other) => Err(refused(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::catalog::Catalog;

    fn catalog() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let c = Catalog::open(&path).unwrap();
        c.conn()
            .execute_batch(
                "INSERT INTO models (name, created_at) VALUES ('b', 't1'), ('a', 't2'), ('c', 't0');",
            )
            .unwrap();
        drop(c);
        (dir, path)
    }

    fn limits(max_rows: usize, max_bytes: usize, time_limit: Duration) -> QueryLimits {
        QueryLimits {
            max_rows,
            max_bytes,
            time_limit,
        }
    }

    fn q(path: &Path, sql: &str) -> Result<QueryResult> {
        let l = limits(100, DEFAULT_MAX_QUERY_BYTES, Duration::from_secs(10));
        query_read_only(path, sql, &l)
    }

    fn models(path: &Path) -> usize {
        let c = Catalog::open(path).unwrap();
        c.conn()
            .query_row("SELECT count(*) FROM models", [], |r| r.get::<_, i64>(0))
            .unwrap() as usize
    }

    #[test]
    fn a_select_returns_its_rows_in_order() {
        let (_dir, path) = catalog();
        let r = q(
            &path,
            "-- the newest first\nSELECT name, created_at, 1.5 AS x, NULL AS n FROM models ORDER BY created_at DESC;",
        )
        .unwrap();
        assert_eq!(r.columns, ["name", "created_at", "x", "n"]);
        let names: Vec<String> = r.rows.iter().map(|row| row[0].to_string()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(r.rows[0][2], SqlValue::Real(1.5));
        assert_eq!(r.rows[0][3], SqlValue::Null);
        assert!(!r.truncated);
        let r = q(
            &path,
            "WITH t AS (SELECT name FROM models) SELECT count(*) FROM t",
        )
        .unwrap();
        assert_eq!(r.rows, vec![vec![SqlValue::Integer(3)]]);
        let l = limits(2, DEFAULT_MAX_QUERY_BYTES, Duration::from_secs(10));
        let r = query_read_only(&path, "SELECT * FROM models", &l).unwrap();
        assert_eq!((r.rows.len(), r.truncated), (2, true));
    }

    #[test]
    fn writes_and_everything_but_one_read_are_refused() {
        let (dir, path) = catalog();
        let attached = dir.path().join("other.db");
        let refused = [
            "INSERT INTO models (name, created_at) VALUES ('d', 'x')",
            "insert into models (name, created_at) values ('d', 'x')",
            "UPDATE models SET name = 'z'",
            "DELETE FROM models",
            "/* hidden */ DELETE FROM models",
            "DROP TABLE models",
            "CREATE TABLE t (x)",
            &format!("ATTACH DATABASE '{}' AS other", attached.display()),
            "DETACH DATABASE main",
            "PRAGMA journal_mode = DELETE",
            "PRAGMA query_only = OFF",
            "PRAGMA user_version",
            "VACUUM",
            "BEGIN",
            "REPLACE INTO models (name, created_at) VALUES ('d', 'x')",
            "WITH t AS (SELECT 1) DELETE FROM models",
            "SELECT 1; DELETE FROM models",
            "SELECT 1; SELECT 2",
            "",
            "   -- only a comment",
        ];
        for sql in refused {
            let e = q(&path, sql).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidArgument { field, .. } if field == "sql"),
                "{sql}: {e}"
            );
        }
        assert_eq!(models(&path), 3);
        assert!(!attached.exists());
        let e = q(&path, "SELECT nope FROM models").unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let e = q(&dir.path().join("missing.db"), "SELECT 1").unwrap_err();
        assert!(e.to_string().contains("missing.db"), "{e}");
    }

    #[test]
    fn a_long_query_is_interrupted() {
        let (_dir, path) = catalog();
        let e = query_read_only(
            &path,
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n",
            &limits(10, DEFAULT_MAX_QUERY_BYTES, Duration::from_millis(200)),
        )
        .unwrap_err();
        assert!(e.to_string().contains("ran past"), "{e}");
    }

    /// Issue 18 item 4: `medray sql` capped rows, not bytes, so `zeroblob` could make the
    /// head hold gigabytes. One huge value is refused by SQLite before it exists, many
    /// moderate ones when they add up past the cap; an answer under the cap is whole.
    #[test]
    fn answers_past_the_byte_cap_are_refused_naming_it() {
        let (_dir, path) = catalog();
        let cap = limits(100_000, 1 << 20, Duration::from_secs(10));
        let e = query_read_only(&path, "SELECT zeroblob(1000000000)", &cap).unwrap_err();
        assert!(e.to_string().contains("--max-query-bytes"), "{e}");
        let many =
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000) \
                    SELECT i, zeroblob(10000) FROM n";
        let e = query_read_only(&path, many, &cap).unwrap_err();
        assert!(e.to_string().contains("1048576 bytes"), "{e}");
        let fits = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50) \
                    SELECT i, zeroblob(10000) FROM n";
        assert_eq!(query_read_only(&path, fits, &cap).unwrap().rows.len(), 50);
    }
}
