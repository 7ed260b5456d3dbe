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
    // 2: the cluster's jobs, their tasks and log lines, and the workers it has seen.
    r#"
    CREATE TABLE jobs (
        id           TEXT PRIMARY KEY NOT NULL, -- job-000001
        seq          INTEGER NOT NULL UNIQUE,
        kind         TEXT NOT NULL,             -- selftest | ingest
        spec         BLOB NOT NULL,             -- prost-encoded medray.v1.JobSpec
        state        TEXT NOT NULL,             -- PENDING RUNNING SUCCEEDED FAILED CANCELLED
        reason       TEXT NOT NULL DEFAULT '',
        result_json  TEXT NOT NULL DEFAULT '',
        created_at   TEXT NOT NULL,             -- RFC 3339 UTC
        started_at   TEXT,
        finished_at  TEXT
    );
    CREATE TABLE tasks (
        job_id       TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        task_id      TEXT NOT NULL,             -- t0001
        spec         BLOB NOT NULL,             -- prost-encoded medray.v1.TaskAssignment
        state        TEXT NOT NULL,             -- PENDING RUNNING SUCCEEDED FAILED CANCELLED
        attempt      INTEGER NOT NULL DEFAULT 0, -- attempts started so far
        worker_id    TEXT,                      -- worker of the current attempt
        failures     INTEGER NOT NULL DEFAULT 0,
        result_json  TEXT,
        error        TEXT,
        PRIMARY KEY (job_id, task_id)
    );
    CREATE TABLE job_logs (
        job_id     TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        seq        INTEGER NOT NULL,            -- 0-based, consecutive per job
        time       TEXT NOT NULL,
        worker_id  TEXT NOT NULL DEFAULT '',
        line       TEXT NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    CREATE TABLE workers (
        id                 TEXT PRIMARY KEY NOT NULL, -- worker-000001
        name               TEXT NOT NULL,
        device             TEXT NOT NULL,
        address            TEXT NOT NULL,
        memory_bytes       INTEGER NOT NULL,
        cores              INTEGER NOT NULL,
        version            TEXT NOT NULL,
        state              TEXT NOT NULL,            -- ALIVE DRAINING DEAD
        reason             TEXT NOT NULL DEFAULT '',
        registered_at      TEXT NOT NULL,
        last_heartbeat_at  TEXT NOT NULL
    );
    "#,
    // 3: the model registry: models, their immutable versions, and aliases.
    r#"
    CREATE TABLE models (
        name         TEXT PRIMARY KEY NOT NULL,
        created_at   TEXT NOT NULL,              -- RFC 3339 UTC
        last_number  INTEGER NOT NULL DEFAULT 0  -- highest N of a `vN` version ever registered
    );
    CREATE TABLE model_versions (
        id               INTEGER PRIMARY KEY AUTOINCREMENT, -- registration order
        name             TEXT NOT NULL REFERENCES models(name),
        version          TEXT NOT NULL,            -- v1, v2, ... or an explicit one
        preset           TEXT NOT NULL,            -- seed | full | custom
        model_config     TEXT NOT NULL,            -- JSON medray_core::model::ModelConfig
        train_config     TEXT NOT NULL,            -- JSON, opaque
        dataset          TEXT NOT NULL,            -- empty for an import
        train_cases      TEXT NOT NULL,            -- JSON array of case ids
        val_cases        TEXT NOT NULL,            -- JSON array of case ids
        job_id           TEXT,
        epochs           INTEGER NOT NULL,
        best_val_dice    REAL,
        final_losses     TEXT NOT NULL,            -- JSON, opaque
        artifact_key     TEXT NOT NULL,            -- stage key of the safetensors weights
        artifact_sha256  TEXT NOT NULL,            -- of the plaintext weights, hex
        artifact_bytes   INTEGER NOT NULL,         -- plaintext bytes
        config_key       TEXT NOT NULL,            -- stage key of the ModelConfig JSON
        source           TEXT NOT NULL CHECK (source IN ('trained', 'imported')),
        created_at       TEXT NOT NULL,            -- RFC 3339 UTC
        medray_version   TEXT NOT NULL,
        UNIQUE (name, version)
    );
    CREATE TABLE model_aliases (
        name        TEXT NOT NULL,
        alias       TEXT NOT NULL,               -- e.g. production
        version     TEXT NOT NULL,
        updated_at  TEXT NOT NULL,               -- RFC 3339 UTC
        PRIMARY KEY (name, alias),
        FOREIGN KEY (name, version) REFERENCES model_versions(name, version)
    );
    "#,
    // 4: inference results, one row per (dataset, model, version, case); a re-run replaces
    // the row. No foreign keys: results stay readable after a model version is deleted or
    // a dataset replaced.
    r#"
    CREATE TABLE results (
        case_id        TEXT NOT NULL,
        dataset        TEXT NOT NULL,
        model_name     TEXT NOT NULL,
        model_version  TEXT NOT NULL,
        status         TEXT NOT NULL CHECK (status IN ('SUCCEEDED', 'FAILED')),
        error          TEXT,                  -- why the case failed (FAILED only)
        dice_before    REAL,                  -- binary Dice of the masks before registration
        dice_score     REAL,                  -- binary Dice after (nearest-warped mask)
        soft_dice      REAL,                  -- the quickstart's soft Dice after
        ssim_score     REAL,                  -- SSIM of warped and fixed
        mi             REAL,                  -- mutual information of warped and fixed (nats)
        tre_before_mm  REAL,                  -- mean keypoint distance before, mm
        tre_mm         REAL,                  -- mean target registration error after, mm
        folding_pct    REAL,                  -- % of voxels with det J <= 0
        ddf_magnitude  REAL,                  -- mean |u|, network-grid voxels
        runtime_ms     REAL,                  -- the worker's time for the case, ms
        device         TEXT NOT NULL,         -- cpu | cuda:N
        worker         TEXT NOT NULL,         -- worker id
        job_id         TEXT NOT NULL,
        output_image   TEXT,                  -- stage key of the registered image
        output_label   TEXT,                  -- stage key of the registered label
        output_ddf     TEXT,                  -- stage key of the DDF
        refine_steps   INTEGER NOT NULL DEFAULT 0,
        created_at     TEXT NOT NULL,         -- RFC 3339 UTC
        PRIMARY KEY (dataset, model_name, model_version, case_id)
    );
    CREATE INDEX results_by_job ON results (job_id);
    "#,
    // 5: honest evaluation. A model version records the data it was trained on (NULL:
    // unknown, e.g. imported weights); a result records whether its case was among it
    // (NULL: unknown, the model records no training data).
    r#"
    ALTER TABLE model_versions ADD COLUMN training_data TEXT; -- JSON medray_core::models::provenance::TrainingData
    ALTER TABLE results ADD COLUMN split TEXT
        CHECK (split IS NULL OR split IN ('train', 'validation', 'held-out'));
    "#,
    // 6: typed progress events on job log lines (prost-encoded medray.v1.TrainProgress),
    // so that clients follow progress without parsing the text.
    r#"
    ALTER TABLE job_logs ADD COLUMN progress BLOB;
    "#,
    // 7: outputs for other tools (issue 19): the spread of log det J, and the stage keys of
    // the ITK/ANTs displacement field transform and of the Jacobian determinant map.
    r#"
    ALTER TABLE results ADD COLUMN log_jac_std REAL;       -- SD of log(max(det J, 1e-9))
    ALTER TABLE results ADD COLUMN output_transform TEXT;  -- stage key, mm LPS transform
    ALTER TABLE results ADD COLUMN output_jacobian TEXT;   -- stage key, det J map
    "#,
];
