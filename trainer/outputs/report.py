"""Classification metrics from labels and predictions: confusion matrix, per-class precision/recall/F1.

NumPy only, shared by training (report.json) and `trainer.prediction.api.evaluate`.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts with true classes as rows and predicted classes as columns."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def classification_report(y_true, y_pred, class_names: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro averages and the confusion matrix, JSON-ready."""
    cm = confusion_matrix(y_true, y_pred, len(class_names))
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    support = cm.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = int(cm.sum())
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    present = support > 0
    confused = [
        {"true": class_names[i], "predicted": class_names[j], "count": int(cm[i, j])}
        for i in range(len(class_names)) for j in range(len(class_names)) if i != j and cm[i, j] > 0
    ]
    confused.sort(key=lambda c: -c["count"])
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "images": total,
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": per_class,
        "most_confused": confused[:10],
        "confusion_matrix": {"labels": list(class_names), "matrix": cm.tolist()},
    }
