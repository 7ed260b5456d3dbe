//! The columns of the `results` table, declared once.
//!
//! [`ResultRow`](super::ResultRow) is declared in `results.rs` through `result_columns!`:
//! each field is a column of the same name, in the table's order. From that one list the
//! macro derives the struct, [`RESULT_COLUMNS`](super::RESULT_COLUMNS) (the names, what
//! `--order-by` accepts), [`COLUMNS`](super::COLUMNS) (name, SQL type, nullability, role
//! and a getter returning a [`Cell`]) and the reading of a row from a `SELECT` of the
//! columns. Writing a row, validating it, printing it (`medray results`) and the report's
//! metrics go through [`COLUMNS`](super::COLUMNS), so adding a column is one line there
//! plus a migration and the wire message (`CaseResult`, converted in `medray_proto::convert`).
//!
//! The SQL type and nullability of a column follow from its Rust type ([`ColumnValue`]);
//! a test checks them against the schema that the migrations create.

use rusqlite::types::{ToSqlOutput, ValueRef};

use crate::catalog::query::SqlValue;
use crate::catalog::{CaseId, DatasetName};
use crate::models::{ModelName, Split};

use super::CaseStatus;

/// The declared SQL type of a column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqlType {
    /// `TEXT`.
    Text,
    /// `REAL`.
    Real,
    /// `INTEGER`.
    Integer,
}

impl SqlType {
    /// The type as SQLite declares it (`TEXT`, `REAL`, `INTEGER`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            SqlType::Text => "TEXT",
            SqlType::Real => "REAL",
            SqlType::Integer => "INTEGER",
        }
    }
}

/// What a column is for, beyond holding its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A plain value, written from the row.
    Plain,
    /// A quality metric of the case, summarised by reports under this heading.
    Metric(&'static str),
    /// Not written from the row: SQLite sets it to this SQL expression when the row is
    /// inserted (`created_at`).
    WrittenAs(&'static str),
}

/// One value of a results row, borrowed from it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cell<'a> {
    /// SQL NULL (a missing metric or output).
    Null,
    /// An integer.
    Integer(i64),
    /// A floating-point number.
    Real(f64),
    /// Text.
    Text(&'a str),
}

impl Cell<'_> {
    /// The number, for a [`Cell::Real`].
    #[must_use]
    pub fn real(self) -> Option<f64> {
        match self {
            Cell::Real(v) => Some(v),
            _ => None,
        }
    }
}

impl From<Cell<'_>> for SqlValue {
    fn from(c: Cell<'_>) -> Self {
        match c {
            Cell::Null => SqlValue::Null,
            Cell::Integer(i) => SqlValue::Integer(i),
            Cell::Real(f) => SqlValue::Real(f),
            Cell::Text(t) => SqlValue::Text(t.to_string()),
        }
    }
}

impl rusqlite::ToSql for Cell<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Cell::Null => ValueRef::Null,
            Cell::Integer(i) => ValueRef::Integer(i),
            Cell::Real(f) => ValueRef::Real(f),
            Cell::Text(t) => ValueRef::Text(t.as_bytes()),
        }))
    }
}

/// One column of the `results` table.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    /// Its name, also the name of the [`ResultRow`](super::ResultRow) field.
    pub name: &'static str,
    /// Its declared SQL type.
    pub sql_type: SqlType,
    /// Whether it may be NULL.
    pub nullable: bool,
    /// What it is for.
    pub role: Role,
    /// Its value in a row.
    pub get: for<'a> fn(&'a super::ResultRow) -> Cell<'a>,
}

impl Column {
    /// The column called `name`.
    #[must_use]
    pub fn named(name: &str) -> Option<&'static Column> {
        super::COLUMNS.iter().find(|c| c.name == name)
    }

    /// Its value in `row`, as the catalog's query answers hold values.
    #[must_use]
    pub fn value(&self, row: &super::ResultRow) -> SqlValue {
        (self.get)(row).into()
    }
}

/// A Rust type a results column holds: its SQL type, its cell and how it is read back.
pub trait ColumnValue: Sized {
    /// The declared SQL type of a column of this type.
    const SQL_TYPE: SqlType;
    /// Whether a column of this type may be NULL.
    const NULLABLE: bool = false;
    /// The value as a cell.
    fn cell(&self) -> Cell<'_>;
    /// Reads column `idx` of `row`.
    ///
    /// # Errors
    /// The column's SQL value does not convert (a wrong type, an invalid name).
    fn read(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Self>;
}

impl ColumnValue for f64 {
    const SQL_TYPE: SqlType = SqlType::Real;
    fn cell(&self) -> Cell<'_> {
        Cell::Real(*self)
    }
    fn read(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Self> {
        row.get(idx)
    }
}

impl ColumnValue for u32 {
    const SQL_TYPE: SqlType = SqlType::Integer;
    fn cell(&self) -> Cell<'_> {
        Cell::Integer(i64::from(*self))
    }
    /// Out-of-range values are clamped.
    fn read(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Self> {
        let v: i64 = row.get(idx)?;
        Ok(u32::try_from(v.clamp(0, i64::from(u32::MAX))).unwrap_or(u32::MAX))
    }
}

impl ColumnValue for String {
    const SQL_TYPE: SqlType = SqlType::Text;
    fn cell(&self) -> Cell<'_> {
        Cell::Text(self)
    }
    fn read(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Self> {
        row.get(idx)
    }
}

impl<T: ColumnValue> ColumnValue for Option<T> {
    const SQL_TYPE: SqlType = T::SQL_TYPE;
    const NULLABLE: bool = true;
    fn cell(&self) -> Cell<'_> {
        self.as_ref().map_or(Cell::Null, ColumnValue::cell)
    }
    fn read(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Self> {
        match row.get_ref(idx)? {
            ValueRef::Null => Ok(None),
            _ => T::read(row, idx).map(Some),
        }
    }
}

/// A column-read error for text that does not parse.
fn conversion(idx: usize, e: crate::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
}

/// [`ColumnValue`] for a type stored as its text form: `$text` gives the text, `$parse`
/// makes the value of a `String` (validating it).
macro_rules! text_column {
    ($ty:ty, $text:expr, $parse:expr) => {
        impl ColumnValue for $ty {
            const SQL_TYPE: SqlType = SqlType::Text;
            fn cell(&self) -> Cell<'_> {
                Cell::Text($text(self))
            }
            fn read(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Self> {
                $parse(row.get::<_, String>(idx)?).map_err(|e| conversion(idx, e))
            }
        }
    };
}

text_column!(CaseId, CaseId::as_str, CaseId::new);
text_column!(DatasetName, DatasetName::as_str, DatasetName::new);
text_column!(ModelName, ModelName::as_str, ModelName::new);
text_column!(CaseStatus, |s: &CaseStatus| s.as_str(), |s: String| {
    s.parse::<CaseStatus>()
});
text_column!(Split, |s: &Split| s.as_str(), |s: String| s
    .parse::<Split>());

/// Declares the results row: a struct whose every field is a column of the `results`
/// table, in the table's order, optionally followed by `=> role` (a [`Role`]; default
/// [`Role::Plain`]). Besides the struct it defines, in the calling module, `COLUMNS`,
/// `RESULT_COLUMNS` and the struct's `from_sql` (reads a `SELECT` of `RESULT_COLUMNS`).
macro_rules! result_columns {
    (
        $(#[$struct_attr:meta])*
        pub struct $row:ident {
            $(
                $(#[$field_attr:meta])*
                $name:ident : $ty:ty $(=> $role:expr)?,
            )*
        }
    ) => {
        $(#[$struct_attr])*
        pub struct $row {
            $(
                $(#[$field_attr])*
                pub $name: $ty,
            )*
        }

        /// Positions of the columns in [`COLUMNS`] and in a `SELECT` of [`RESULT_COLUMNS`].
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy)]
        enum Position {
            $($name,)*
        }

        /// How many columns the `results` table has.
        const COLUMN_COUNT: usize = [$(stringify!($name),)*].len();

        /// Columns of the `results` table, in order: what `--order-by` accepts.
        pub const RESULT_COLUMNS: [&str; COLUMN_COUNT] = [$(stringify!($name),)*];

        /// The columns of the `results` table, in order, with their types, roles and getters.
        pub static COLUMNS: [$crate::results::columns::Column; COLUMN_COUNT] = [
            $(
                $crate::results::columns::Column {
                    name: stringify!($name),
                    sql_type: <$ty as $crate::results::columns::ColumnValue>::SQL_TYPE,
                    nullable: <$ty as $crate::results::columns::ColumnValue>::NULLABLE,
                    role: $crate::results::columns::result_columns!(@role $($role)?),
                    get: |r| $crate::results::columns::ColumnValue::cell(&r.$name),
                },
            )*
        ];

        impl $row {
            /// Reads a row from a `SELECT` of [`RESULT_COLUMNS`], in their order.
            fn from_sql(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
                Ok(Self {
                    $(
                        $name: $crate::results::columns::ColumnValue::read(
                            r,
                            Position::$name as usize,
                        )?,
                    )*
                })
            }
        }
    };
    (@role) => {
        $crate::results::columns::Role::Plain
    };
    (@role $role:expr) => {
        $role
    };
}

pub(crate) use result_columns;

#[cfg(test)]
mod tests {
    use super::super::{COLUMNS, RESULT_COLUMNS};
    use super::*;
    use crate::catalog::Catalog;

    #[test]
    fn the_declaration_matches_the_schema() {
        let c = Catalog::open_in_memory().unwrap();
        let schema: Vec<(String, String, bool)> = c
            .conn()
            .prepare(
                "SELECT name, type, \"notnull\" FROM pragma_table_info('results') ORDER BY name",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        // Same names, types and NULL rules (`split` was added last by migration 5, so the
        // table's own order differs from the declaration's).
        let mut declared: Vec<(String, String, bool)> = COLUMNS
            .iter()
            .map(|c| {
                (
                    c.name.to_string(),
                    c.sql_type.as_str().to_string(),
                    !c.nullable,
                )
            })
            .collect();
        declared.sort();
        assert_eq!(declared, schema);
        assert_eq!(COLUMNS.map(|c| c.name), RESULT_COLUMNS);
    }

    #[test]
    fn getters_read_their_field() {
        let mut r = super::super::tests::row("case_001", "v1", 0.8, "job-1");
        r.tre_mm = Some(1.5);
        r.refine_steps = 7;
        r.split = Some(Split::HeldOut);
        let get = |name: &str| (Column::named(name).unwrap().get)(&r);
        assert_eq!(get("case_id"), Cell::Text("case_001"));
        assert_eq!(get("status"), Cell::Text("SUCCEEDED"));
        assert_eq!(get("error"), Cell::Null);
        assert_eq!(get("tre_mm"), Cell::Real(1.5));
        assert_eq!(get("dice_score"), Cell::Real(0.8));
        assert_eq!(get("soft_dice"), Cell::Null);
        assert_eq!(get("refine_steps"), Cell::Integer(7));
        assert_eq!(get("split"), Cell::Text("held-out"));
        assert!(Column::named("nope").is_none());
    }
}
