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


# The schema before prediction jobs had their own progress columns: they counted images in epoch/epochs.
SCHEMA_WITHOUT_IMAGE_COUNTS = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, name TEXT NOT NULL, state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0, source TEXT, path TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL,
    epoch INTEGER NOT NULL DEFAULT 0, epochs INTEGER, metrics TEXT, best_val_accuracy REAL, outcome TEXT,
    error_kind TEXT, error TEXT, pid INTEGER, pid_start INTEGER, host TEXT, gpu TEXT,
    multi_gpu INTEGER NOT NULL DEFAULT 0, engine TEXT, engine_ref TEXT, engine_state TEXT, running_since REAL,
    ran_seconds REAL, events_offset INTEGER NOT NULL DEFAULT 0, time_budget REAL, deadline REAL, warnings TEXT,
    kind TEXT, model_job TEXT
);
CREATE INDEX jobs_state ON jobs (state, seq);
"""


def test_a_ledger_from_before_image_counts_moves_a_prediction_jobs_progress_to_them(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_WITHOUT_IMAGE_COUNTS)
    db.execute("INSERT INTO jobs (id, name, state, created_at, updated_at, epoch, epochs, kind, model_job) VALUES "
               "('t-1', 't', 'succeeded', 1, 1, 4, 4, 'train', NULL), "
               "('p-2', 'p', 'running', 2, 2, 7, 12, 'predict', 't-1'), "
               "('o-3', 'o', 'queued', 3, 3, 0, 3, NULL, NULL)")
    db.commit()
    db.close()
    ledger = Ledger(path)
    train, predict, older = ledger.jobs()
    assert (train.epoch, train.epochs, train.images_done, train.images_total, train.progress) == (4, 4, None, None,
                                                                                                    (4, 4))
    assert (predict.epoch, predict.epochs, predict.images_done, predict.images_total) == (0, None, 7, 12)
    assert predict.progress == (7, 12) and predict.model_job == "t-1" and predict.state == JobState.RUNNING
    assert (older.kind, older.progress) == (None, (0, 3))  # a job from before kinds: a training job
    assert ledger.update("p-2", images_done=12).progress == (12, 12)
    ledger.close()
    again = Ledger(path)  # a second open moves nothing again
    assert again.get("p-2").progress == (12, 12) and again.get("t-1").progress == (4, 4)
    again.close()


def test_a_prediction_job_restored_from_an_old_status_json_counts_images(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    job = ledger.restore({"id": "p-1", "name": "p", "state": "succeeded", "created_at": 1, "kind": "predict",
                          "epoch": 12, "epochs": 12})
    assert (job.epoch, job.epochs, job.progress) == (0, None, (12, 12))
    ledger.close()
