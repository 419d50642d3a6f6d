"""The ledger's schema over versions: an older ledger opens, keeps every job, and loses its sentinel strings."""

from __future__ import annotations

import sqlite3

from daemon.ledger import JobState, Ledger

OLD_SCHEMA = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, name TEXT NOT NULL, state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0, source TEXT NOT NULL, path TEXT NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, started_at REAL, finished_at REAL, epoch INTEGER NOT NULL DEFAULT 0, epochs INTEGER,
    metrics TEXT, best_val_accuracy REAL, outcome TEXT, error_kind TEXT, error TEXT, pid INTEGER, gpu TEXT
);
CREATE INDEX jobs_state ON jobs (state, seq);
"""


def test_an_older_ledger_is_migrated_in_place_and_empty_paths_become_none(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO jobs (id, name, state, source, path, created_at, updated_at, epoch) VALUES "
               "('a-1', 'a', 'succeeded', '', '', 1, 1, 3), ('b-2', 'b', 'queued', '/in/b', '/st/b', 2, 2, 0)")
    db.commit()
    db.close()
    ledger = Ledger(path)
    a, b = ledger.jobs()
    assert (a.id, a.state, a.path, a.source, a.epoch) == ("a-1", JobState.SUCCEEDED, None, None, 3)
    assert (b.path, b.source, b.multi_gpu, b.host, b.pid_start) == ("/st/b", "/in/b", False, None, None)
    assert ledger.update("a-1", path=None).path is None  # NULL is allowed now
    assert ledger.next_queued().id == "b-2"  # order and index kept
    ledger.close()
    again = Ledger(path)  # a second open finds nothing to do
    assert [j.id for j in again.jobs()] == ["a-1", "b-2"]
    again.close()
