"""Taking a dropped folder or archive in: job ids, moving it out of the inbox without ever losing it, extracting an
archive (`daemon.unpack`), validating its spec and limits (`take_in`).

Every step is idempotent so that recovery after a crash is simply "do it again":

- same filesystem: one ``rename`` from ``inbox/<name>`` to ``state/jobs/<id>/dataset`` (an archive file: to
  ``state/jobs/<id>/<name>``, then extracted beside it);
- across filesystems (separate bind mounts): ``rename`` to a hidden ``inbox/.dropfit-claim-<id>`` (atomic, and the
  watcher ignores hidden names), copy to a temporary folder beside the target, ``rename`` it into place, and only
  then delete the hidden source.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from contract.atomic import write_json
from contract.files import JOB_FILE, LABELS_FILE, PREDICT_FILE, SPEC_FILE
from contract.predict_spec import PredictRun, load_predict_spec
from contract.spec import JobSpec, SpecError, load_spec, resolve_path
from daemon.unpack import ArchiveError, archive_kind, extract
from daemon.watch import ignored_name

log = logging.getLogger(__name__)

# The resolved spec, written once at intake into state/jobs/<id>/: what the trainer runs (`trainer run --spec`).


@dataclass
class Intake:
    """How taking in a claimed job ended: ``queued`` (with its spec), ``gone``, ``failed`` or ``rejected``."""

    outcome: str
    spec: JobSpec | PredictRun | None = None
    kind: str | None = None  # the error kind, for failed and rejected
    message: str | None = None
    kept: Path | None = None  # where the data is kept, when not at the job's dataset path


def may_be_a_job(inbox: Path, name: str) -> bool:
    """A folder or an archive file (not a link); anything else in the inbox is ignored, and never waited on."""
    path = inbox / name
    if ignored_name(name) or path.is_symlink():
        return False
    return path.is_dir() or (archive_kind(name) is not None and path.is_file())


def take_in(name: str, source: Path | None, hidden: Path, dataset: Path, defaults: dict, limits,
            models=None) -> Intake:
    """Claim a dropped folder or archive into ``dataset``, extract it if need be, validate its spec and write the
    resolved spec (`SPEC_FILE`) beside the dataset. ``models(ref)`` resolves a ``predict.yaml``'s ``model:`` to
    ``(job id, outbox folder)`` or raises LookupError (`daemon.models.resolve`).

    Safe to call again for the same job after a crash at any point. ``source`` is None when the drop's place in the
    inbox is not known (a ledger rebuilt from the outbox): then only what is already claimed is looked at.
    ``limits`` is the config's ``limits`` section.
    """
    kept = dataset.parent / name  # a dropped archive, kept with its job
    # Decided by what is on disk (a folder may be named x.zip), wherever a crash left it: inbox, hidden, kept.
    where = next((p for p in (source, hidden, kept) if p is not None and p.exists()), None)
    is_archive = archive_kind(name) is not None and where is not None and where.is_file()
    try:
        if not claim(source, hidden, kept if is_archive else dataset):
            return Intake("gone")
    except OSError as exc:
        # The dataset is still in the inbox (or our hidden copy of it); nothing is lost, the job fails.
        still = next((p for p in (hidden, source) if p is not None and p.exists()), None)
        return Intake("failed", kind="io", message=f"could not move the dataset out of the inbox: "
                                                   f"{_describe(exc)}", kept=still)
    if source is not None and not is_archive:
        relink(dataset, source)
    if is_archive and not dataset.exists():
        try:
            extract(kept, dataset, limits)
        except ArchiveError as exc:
            return Intake("rejected", kind="archive", message=f"{name}: {exc}", kept=kept)
        except OSError as exc:  # our disk, not the archive: a failure, not a rejection
            return Intake("failed", kind="io", message=f"{name}: could not extract it: {_describe(exc)}",
                          kept=kept)
    spec, error = validate(dataset, defaults, display=name, max_classes=limits.max_classes, models=models)
    if error:
        return Intake("rejected", kind="spec", message=error)
    try:
        write_json(dataset.parent / SPEC_FILE, spec.model_dump(mode="json"))
    except OSError as exc:
        return Intake("failed", kind="io", message=f"could not write {dataset.parent / SPEC_FILE}: {exc}")
    return Intake("queued", spec=spec)


def _describe(exc: OSError) -> str:
    """'no space left on device: /the/file (and 12 more file(s))' rather than a repr."""
    reason = (exc.strerror or str(exc)).lower() if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    text = f"{reason}: {exc.filename}" if exc.filename else reason
    more = getattr(exc, "more", 0)
    return text + (f" (and {more} more file(s))" if more else "")


def new_job_id(name: str, now: float | None = None) -> str:
    """``<folder>-<UTC time>-<short random>``: sortable, unique even for the same name dropped twice."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:60] or "job"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return f"{safe}-{stamp}-{secrets.token_hex(3)}"


def claim_hidden_path(inbox: Path, job_id: str) -> Path:
    return inbox / f".dropfit-claim-{job_id}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def copy_into_place(src: Path, dst: Path) -> None:
    """Copy ``src`` (a folder or a file) to ``dst`` via a temporary sibling, so ``dst`` exists only once complete.

    Raises:
        OSError: naming the first file that could not be copied (and how many more failed); the partial copy is
            removed, so a full disk is not left fuller.
    """
    tmp = dst.with_name(f".{dst.name}.partial")
    _remove(tmp)
    try:
        if src.is_dir():
            shutil.copytree(src, tmp, symlinks=True)
        else:
            shutil.copy2(src, tmp)
        os.rename(tmp, dst)
    except shutil.Error as exc:
        _remove(tmp)
        # copytree collects one (source, destination, reason) per file: a full disk gives thousands.
        failures = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
        _src, dst, reason = failures[0] if failures else ("?", None, str(exc))
        code = _errno(reason)
        error = OSError(code, os.strerror(code) if code else str(reason), dst)
        error.more = len(failures) - 1  # the other files that failed the same way
        raise error from None
    except OSError:
        _remove(tmp)
        raise
    _fsync_dir(dst.parent)


def _errno(reason: str) -> int | None:
    match = re.search(r"\[Errno (\d+)\]", str(reason))
    return int(match.group(1)) if match else None


def claim(source: Path | None, hidden: Path, target: Path) -> bool:
    """Move a dropped folder (or archive file) to ``target``; safe to call again after a crash at any point.

    Returns False if it is gone (removed or renamed by the user before it could be claimed).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        _remove(hidden)  # an earlier attempt finished the copy
        return True
    if not hidden.exists():
        if source is None:
            return False
        try:
            os.rename(source, target)
            _fsync_dir(target.parent)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        try:
            os.rename(source, hidden)
        except FileNotFoundError:
            return False
    copy_into_place(hidden, target)
    _remove(hidden)
    return True


def relink(dataset: Path, source: Path) -> int:
    """Links inside a claimed drop that named a place inside it by its absolute path in the inbox (as
    ``ln -s "$PWD/..."`` makes them) are made relative, so they still point inside the drop now that it has moved.
    Other links are left as they are (the trainer skips those that point outside). Returns how many were changed;
    safe to call again."""
    old_root = os.path.normpath(os.fspath(source))
    changed = 0
    for folder, dirs, files in os.walk(dataset):
        for name in (*dirs, *files):
            link = os.path.join(folder, name)
            if not os.path.islink(link):
                continue
            target = os.path.normpath(os.readlink(link))
            if not os.path.isabs(target) or not (target == old_root or target.startswith(old_root + os.sep)):
                continue
            moved = os.path.join(os.fspath(dataset), os.path.relpath(target, old_root))
            tmp = os.path.join(folder, f".{name}.relink")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(os.path.relpath(moved, folder), tmp)
            os.replace(tmp, link)  # in one step: a crash leaves the old link or the new one
            changed += 1
    return changed


def move_tree(src: Path, dst: Path) -> None:
    """Move a folder we own (state to archive), by rename or copy-then-delete; idempotent after a crash."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        shutil.rmtree(src, ignore_errors=True)
        return
    try:
        os.rename(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    copy_into_place(src, dst)
    shutil.rmtree(src)


def has_spec(folder: Path) -> bool:
    """Whether a dropped folder holds a ``job.yaml`` or a ``predict.yaml`` (a file, a folder or a dangling link by
    that name counts: it is rejected with the reason rather than waited on)."""
    return any((folder / name).exists() or (folder / name).is_symlink() for name in (JOB_FILE, PREDICT_FILE))


def validate(dataset: Path, defaults: dict | None = None, display: str | None = None,
             max_classes: int | None = None, models=None) -> tuple[JobSpec | PredictRun | None, str | None]:
    """Load and check a claimed job's ``job.yaml`` (or ``predict.yaml``); returns ``(spec, None)`` or
    ``(None, error text)``.

    ``display`` replaces the claimed folder's path in messages (the name the user dropped it under).
    ``max_classes`` rejects datasets with more class folders than that before any trainer is started.
    ``models`` resolves a prediction job's ``model:`` (see `take_in`).
    """
    predict = dataset / PREDICT_FILE
    if predict.exists() or predict.is_symlink():
        return _validate_prediction(dataset, display, models)
    try:
        spec = load_spec(dataset / JOB_FILE, defaults)
        paths = {field: resolve_path(dataset, relative, field) for field, relative in spec.paths().items()}
    except SpecError as exc:
        # Name the file as the user knows it (inside the folder they dropped), not by our state path.
        return None, str(exc).replace(str(dataset), display) if display else str(exc)
    if max_classes is not None:
        error = _check_class_count(paths["data.train"], spec, max_classes)
        if error:
            return None, error.replace(str(dataset), display) if display else error
    return spec, None


def _validate_prediction(dataset: Path, display: str | None, models) -> tuple[PredictRun | None, str | None]:
    def shown(text: str) -> str:
        return text.replace(str(dataset), display) if display else text

    where = f"{display or dataset}/{PREDICT_FILE}"
    if (dataset / JOB_FILE).exists() or (dataset / JOB_FILE).is_symlink():
        return None, (f"{display or dataset}: holds both {JOB_FILE} and {PREDICT_FILE}; expected one of them: "
                      f"{JOB_FILE} to train a model, {PREDICT_FILE} to label images with one")
    try:
        spec = load_predict_spec(dataset / PREDICT_FILE)
        images = resolve_path(dataset, spec.images, "images", PREDICT_FILE)
    except SpecError as exc:
        return None, shown(str(exc))
    if not images.is_dir():
        return None, f"{where}: images: no folder {spec.images!r} in the drop"
    if models is None:
        return None, f"{where}: model: no model catalogue here (prediction jobs run under the daemon)"
    try:
        job_id, folder = models(spec.model)
    except LookupError as exc:
        return None, f"{where}: model: {exc}"
    if spec.min_confidence == "suggested" and _suggested(folder) is None:
        return None, (f"{where}: min_confidence: suggested, but the model of {job_id} records no threshold (its "
                      "labels.json has no calibration.min_confidence); give a number from 0 to 1")
    return PredictRun(spec=spec, model_job=job_id, model_dir=str(folder)), None


def _suggested(model_dir: Path) -> float | None:
    try:
        labels = json.loads((model_dir / LABELS_FILE).read_text(encoding="utf-8"))
        return (labels.get("calibration") or {}).get("min_confidence")
    except (OSError, ValueError, AttributeError):
        return None


def _check_class_count(train: Path, spec: JobSpec, max_classes: int) -> str | None:
    if spec.data.labels_csv or not train.is_dir():
        return None  # the trainer checks CSV labels and missing folders with its own messages
    if spec.data.classes:
        count = len(spec.data.classes)
    else:
        count = 0
        with os.scandir(train) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                    count += 1
    if count > max_classes:
        return (f"data.train: {train} holds {count} class folders; the limit is {max_classes} "
                "(limits.max_classes in the daemon's config.yaml)")
    return None
