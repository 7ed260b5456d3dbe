//! Versioned schema migrations of the catalog. Migration `n` (1-based) moves the schema from
//! version `n - 1` to `n`; each runs in its own transaction with the version bump. Never edit
//! a released migration: append a new one.

/// The migrations, in order.
pub const MIGRATIONS: &[&str] = &[
    // 1: datasets and their cases.
    r#"
    CREATE TABLE datasets (
        name            TEXT PRIMARY KEY NOT NULL,
        source          TEXT NOT NULL,
        created_at      TEXT NOT NULL,   -- RFC 3339 UTC
        case_count      INTEGER NOT NULL,
        bytes           INTEGER NOT NULL, -- plaintext bytes of all files
        content_sha256  TEXT NOT NULL
    );
    CREATE TABLE cases (
        dataset             TEXT NOT NULL REFERENCES datasets(name) ON DELETE CASCADE,
        case_id             TEXT NOT NULL,
        fixed_key           TEXT NOT NULL,
        fixed_sha256        TEXT NOT NULL,
        moving_key          TEXT NOT NULL,
        moving_sha256       TEXT NOT NULL,
        fixed_mask_key      TEXT,
        fixed_mask_sha256   TEXT,
        moving_mask_key     TEXT,
        moving_mask_sha256  TEXT,
        keypoints_key       TEXT,
        keypoints_sha256    TEXT,
        shape               TEXT NOT NULL, -- JSON [H, W, D] voxels
        spacing_mm          TEXT NOT NULL, -- JSON [sx, sy, sz]
        affine              TEXT NOT NULL, -- JSON 4x4 row-major, mm
        intensity_min       REAL NOT NULL,
        intensity_max       REAL NOT NULL,
        keypoint_count      INTEGER NOT NULL,
        PRIMARY KEY (dataset, case_id)
    );
    "#,
];
