"""A dataset as `train_cnn` uses it: scanned (class folders or a CSV), audited (`trainer.data.audit`: duplicates kept
on one side of every split, conflicting labels left out), and split into training, validation and test images.

TensorFlow-free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from contract.options import TrainOptions
from trainer.data import handedness
from trainer.data.audit import audit, describe
from trainer.data.scan import DatasetError, Sample, Scan, relative, scan_csv, scan_directory, split
from trainer.outputs import results

log = logging.getLogger(__name__)

DUPLICATE_WARNING = 0.01  # a warning (status.json, the report) when more than this share of the images are copies


@dataclass
class Dataset:
    """What the data step found: the scan, the three splits, and what the audit said."""

    scan: Scan
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    info: dict  # dataset.json
    grey_fraction: float | None = None  # of the images, by content (None without an audit: from the headers)
    target_size: tuple[int, int] | None = None  # set once resolved
    thumbs: dict[str, np.ndarray] | None = None  # the audit's thumbnails of `handedness.sample`'s training images

    def held_out(self) -> list[Sample]:
        return self.test or self.val


def load(train_directory, o: TrainOptions) -> Dataset:
    """Scan, audit and split ``train_directory`` as ``o`` says.

    Raises:
        DatasetError: for unusable data (missing folders, fewer than two classes, a class count that disagrees).
    """
    classes = list(o.classes) if o.classes else None
    scan = scan_csv(train_directory, o.labels_csv, classes) if o.labels_csv is not None \
        else scan_directory(train_directory, classes)
    class_names = scan.class_names
    if o.num_classes is not None and o.num_classes != len(class_names):
        raise DatasetError(f"num_classes={o.num_classes} does not match the {len(class_names)} classes found in "
                           f"{str(train_directory)!r}: {class_names}. Leave num_classes out to derive it.")
    extra_scans = {}
    if o.test_directory is not None:
        extra_scans["test"] = _side_scan(o.test_directory, class_names, "test_directory")
    if o.validation_directory is not None:
        extra_scans["validation"] = _side_scan(o.validation_directory, class_names, "validation_directory")

    groups, excluded, leaked, result = {}, set(), set(), None
    everything = [*scan.samples, *(s for side in extra_scans.values() for s in side.samples)]
    if o.audit and everything:
        result = audit([s.path for s in everything], [s.label for s in everything], threshold=o.near_threshold)
        groups = {everything[i].path: g for i, g in result.group_of.items()}
        if o.audit_conflicts == "exclude":
            excluded = {everything[i].path for i in result.conflicting()}
        side_paths = {s.path for side in extra_scans.values() for s in side.samples}
        for group in result.groups:  # a training copy of an image in a given validation or test folder
            paths = [everything[i].path for i in group]
            if any(p in side_paths for p in paths):
                leaked.update(p for p in paths if p not in side_paths)

    pool = [s for s in scan.samples if s.path not in excluded and s.path not in leaked]
    if "test" in extra_scans:
        test = [s for s in extra_scans["test"].samples if s.path not in excluded]
    else:
        pool, test = split(pool, o.test_split, o.seed, salt="test/", groups=groups)
    if "validation" in extra_scans:
        train, val = pool, [s for s in extra_scans["validation"].samples if s.path not in excluded]
    else:
        train, val = split(pool, o.validation_split, o.seed, groups=groups)
    info = results.dataset_info(scan, extra_scans, train, val, test)
    grey, thumbs = None, None
    if result is not None:
        index = {s.path: i for i, s in enumerate(everything)}
        thumbs = {s.path: result.thumbs[index[s.path]] for part in handedness.sample(train, len(class_names), o.seed)
                  for s in part}
        split_of = {s.path: name for name, samples in (("train", train), ("validation", val), ("test", test))
                    for s in samples}
        index_split = {i: split_of[s.path] for i, s in enumerate(everything) if s.path in split_of}
        dropped = {i for i, s in enumerate(everything) if s.path in excluded or s.path in leaked}
        info["audit"] = describe(result, [s.path for s in everything], [s.label for s in everything], class_names,
                                 index_split, lambda p: relative(scan.root, p), dropped)
        info["audit"]["excluded"] = sorted(relative(scan.root, p) for p in excluded)
        info["audit"]["excluded_as_copies_of_held_out_images"] = sorted(relative(scan.root, p) for p in leaked)
        info["warnings"] += _warnings(info["audit"])
        grey = info["audit"]["grey_fraction"]
    log.info("%d classes; %d training, %d validation, %d test images; %d file(s) skipped", len(class_names),
             len(train), len(val), len(test), len(info["skipped"]))
    return Dataset(scan, class_names, train, val, test, info, grey, thumbs=thumbs)


def _warnings(report: dict) -> list[str]:
    out = []
    if report["duplicate_fraction"] > DUPLICATE_WARNING:
        out.append(f"{report['duplicate_images']} image(s) ({report['duplicate_fraction']:.1%}) are copies of others "
                   f"({report['duplicate_groups']} group(s)); each group was kept on one side of the splits")
    if report["conflicts"]:
        out.append(f"{report['conflicts']} image(s) appear under more than one label (as copies in different class "
                   "folders); " + (f"those {report['excluded_conflicting_images']} files are left out of training and "
                                   "evaluation" if report["excluded_conflicting_images"]
                                   else "kept (data.audit.conflicts: keep)"))
    if report["excluded_as_copies_of_held_out_images"]:
        out.append(f"{len(report['excluded_as_copies_of_held_out_images'])} training image(s) are copies of images "
                   "in the validation or test folder; left out of training")
    return out


def _side_scan(directory, class_names, what):
    side = scan_directory(directory, class_names, allow_missing=True, what=what)
    if not side.samples:
        raise DatasetError(f"{what} {str(directory)!r} holds no usable image of the classes {class_names}")
    return side
