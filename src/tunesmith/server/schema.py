"""The SQLite tables of the jobs database (files, jobs, events, checkpoints)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    filename TEXT NOT NULL,
    path TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    purpose TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    model TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    suffix TEXT,
    seed INTEGER NOT NULL,
    hyperparameters TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    queued_at REAL NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    fine_tuned_model TEXT,
    error TEXT,
    trained_tokens INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER,
    run_dir TEXT NOT NULL,
    metadata TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, queued_at, seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    level TEXT NOT NULL,
    type TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    path TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    metrics TEXT
);
CREATE INDEX IF NOT EXISTS checkpoints_job ON checkpoints(job_id, step);
"""
