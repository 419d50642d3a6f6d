"""Settling without a recursive watch: `daemon.watch.Settler` and `fingerprint`, on real folders, with a clock the
test moves (time itself is the only thing not real here)."""

from __future__ import annotations

import os

from daemon.watch import Settler, fingerprint


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_fingerprint_sees_every_kind_of_change(tmp_path):
    folder = tmp_path / "drop"
    (folder / "a" / "deep").mkdir(parents=True)
    (folder / "a" / "deep" / "x.png").write_bytes(b"1234")
    first = fingerprint(folder)
    assert first[:3] == (1, 3, 4)
    (folder / "a" / "deep" / "x.png").write_bytes(b"123456")  # grows
    assert fingerprint(folder) != first
    second = fingerprint(folder)
    os.utime(folder / "a" / "deep" / "x.png", ns=(second[3] + 10**9, second[3] + 10**9))  # touched later
    assert fingerprint(folder) != second
    assert fingerprint(tmp_path / "gone") is None


def test_a_folder_settles_only_after_it_stopped_changing_for_settle_seconds(tmp_path):
    clock = Clock()
    inbox = tmp_path / "inbox"
    (inbox / "drop" / "a").mkdir(parents=True)
    settler = Settler(inbox, settle_seconds=5.0, clock=clock)
    settler.touch("drop")
    for step in range(20):  # a copy in progress: a new file every second, deep inside
        clock.now += 1.0
        (inbox / "drop" / "a" / f"{step}.png").write_bytes(b"x")
        assert settler.due() == [], f"settled while still being written (step {step})"
    last_change = clock.now
    settled_at = None
    while settled_at is None and clock.now < last_change + 30:
        clock.now += 0.25
        if settler.due() == ["drop"]:
            settled_at = clock.now
    assert last_change + 5.0 <= settled_at <= last_change + 5.0 + 2.0
    assert len(settler) == 0


def test_a_removed_drop_is_forgotten(tmp_path):
    clock = Clock()
    (tmp_path / "drop").mkdir()
    settler = Settler(tmp_path, settle_seconds=1.0, clock=clock)
    settler.touch("drop")
    (tmp_path / "drop").rmdir()
    clock.now += 2
    assert settler.due() == [] and len(settler) == 0 and settler.next_deadline() is None
