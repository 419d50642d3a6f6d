"""A pretrained backbone tried against the from-scratch network within the job's budget (``try_pretrained``).

On colour photos of 96 px or more, ImageNet features usually beat anything a CPU can learn from a few hundred images
in minutes; on small greyscale images (digits, Fashion-MNIST) the from-scratch network wins and is faster. So a job
decides by trying: when ImageNet weights are on this host (`trainer.network.pretrained.find_weights`), the backbone
(`TRIAL_ARCHITECTURE`, head first, then fine-tuned) trains on `RIVAL_SHARE` of the training time left, the job's own
network on the rest, and the one with the better validation accuracy (then loss) is the model the job writes. Without
weights the job trains from scratch and says why in summary.json, the report and the log — it never downloads.

The backbone's state lives in ``<work>/pretrained/``: a restarted job resumes its epochs there, within the share of
time its first run gave it (``trial.json``), and the time it used counts against the job's budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from contract.atomic import write_json
from contract.options import TrainOptions
from trainer.data.dataset import Dataset
from trainer.data.scan import auto_target_size
from trainer.fitting import budget
from trainer.fitting.callbacks import load_json
from trainer.network.pretrained import TRIAL_ARCHITECTURE, find_weights, missing_weights_message

log = logging.getLogger(__name__)

MIN_SIDE = 96  # below this ImageNet features lose most of their edge, and the backbone its speed
RIVAL_SHARE = 0.4  # of the training time left when the trial starts
# Two networks each cost about 15 s of building, measuring and tracing on a 2-core CPU before they train: with less
# time left than this, ``auto`` trains the job's own network only (measured: a 50 s job spent 69 s on both).
MIN_TRIAL_SECONDS = 120.0
FINE_TUNE_SHARE, FINE_TUNE_LEARNING_RATE = 0.2, 1e-5  # as job.yaml's model.fine_tune defaults (10 of 50 epochs)
FOLDER = "pretrained"


@dataclass
class Trial:
    """Whether this job tries a pretrained backbone, with which weights, and why (recorded in summary.json)."""

    tried: bool
    why: str
    weights: Path | None = None
    ends_at: float | None = None  # seconds of the job's budget by which the backbone's training ends
    candidates: list[dict] = field(default_factory=list)
    kept: str | None = None

    @classmethod
    def of(cls, o: TrainOptions, data: Dataset, clock: budget.Clock | None, work: Path | None) -> Trial:
        """Decide from the options, the data and the budget (`try_pretrained`: ``auto``, True or False); a resumed
        job keeps the share of time its first run gave the backbone (``<work>/pretrained/trial.json``)."""
        reason = _not_eligible(o, data, clock)
        if reason:
            return cls(False, reason)
        weights = find_weights(TRIAL_ARCHITECTURE)
        if weights is None:
            message = missing_weights_message(TRIAL_ARCHITECTURE)
            log.warning("pretrained backbone: %s", message)
            return cls(False, message)
        ends = clock.used() + RIVAL_SHARE * clock.left() if clock is not None else None
        folder = rival_folder(work)
        if folder is not None:
            ends = load_json(folder / "trial.json", {}).get("ends_at", ends)
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / "trial.json", {"ends_at": ends, "weights": str(weights)})
        return cls(True, f"colour images of {MIN_SIDE} px or more and ImageNet weights found", weights, ends)

    def rival_options(self, o: TrainOptions) -> TrainOptions:
        """The backbone's options: the job's, with the pretrained network in place of its own."""
        return o.replace(architecture=TRIAL_ARCHITECTURE, weights=str(self.weights), filters=None, dropout=None,
                         fine_tune_epochs=max(1, round(FINE_TUNE_SHARE * o.num_epochs)),
                         fine_tune_learning_rate=FINE_TUNE_LEARNING_RATE,
                         fine_tune_layers=None, exports=(), weight_averaging=False, color_mode="rgb",
                         try_pretrained=False)

    def rival_clock(self, clock: budget.Clock | None, work: Path | None) -> budget.Clock | None:
        """The job's clock, ending when the backbone's share is spent; it keeps saving the whole job's time."""
        if clock is None:
            return None
        return budget.Clock(self.ends_at, clock.started, clock.used_before, saves_to=work)

    def failed(self, error: Exception) -> None:
        """The weights were found but could not be used: the job goes on from scratch, and says so."""
        self.tried, self.candidates = False, []
        self.why = (f"the ImageNet weights in {self.weights} could not be used ({error}); trained from scratch only")
        log.warning("pretrained backbone: %s", self.why)

    def record(self, name: str, scores: dict, epochs: int, seconds: float) -> None:
        """One candidate's validation scores."""
        self.candidates.append({"network": name, **{k: round(float(v), 5) for k, v in scores.items()},
                                "epochs": epochs, "seconds": round(seconds, 1)})

    def rival_wins(self) -> bool:
        """Whether the backbone (the first candidate recorded) beats the job's own network (the second): higher
        validation accuracy, or the same and lower validation loss."""
        if len(self.candidates) < 2:
            return False
        rival, own = self.candidates
        wins = (rival["accuracy"], -rival["loss"]) > (own["accuracy"], -own["loss"])
        self.kept = rival["network"] if wins else own["network"]
        log.info("pretrained backbone: validation accuracy %.4f against %.4f from scratch: keeping %s",
                 rival["accuracy"], own["accuracy"], self.kept)
        return wins

    def to_json(self) -> dict:
        return {"tried": self.tried, "why": self.why, "architecture": TRIAL_ARCHITECTURE,
                "weights": str(self.weights) if self.weights else None, "candidates": self.candidates,
                "kept": self.kept}


def _not_eligible(o: TrainOptions, data: Dataset, clock) -> str | None:
    """Why this job does not try a backbone, or None when it does."""
    if o.try_pretrained is False:
        return "try_pretrained is false"
    if o.architecture != "cnn" or o.weights is not None:
        return f"the job asks for architecture {o.architecture!r}" + (" with weights" if o.weights else "")
    if o.try_pretrained == "auto" and clock is None:
        return "no time_budget (auto tries a backbone only within a budget)"
    if o.try_pretrained == "auto" and clock.left() < MIN_TRIAL_SECONDS:
        return f"{clock.left():.0f} s left: too little for two networks (auto tries from {MIN_TRIAL_SECONDS:.0f} s)"
    if not data.val:
        return "no validation images to choose by"
    if o.color_mode == "grayscale" or (data.grey_fraction is not None and data.grey_fraction >= 0.95):
        return "greyscale images (ImageNet backbones are for colour photos)"
    side = min(o.target_size) if isinstance(o.target_size, tuple) else \
        min(auto_target_size(data.train, floor=16, multiple=4, upscale=False))
    if side < MIN_SIDE:
        return f"images of {side} px (a backbone is tried from {MIN_SIDE} px)"
    return None


def rival_folder(work: Path | None) -> Path | None:
    return None if work is None else work / FOLDER
