"""The confusion matrix (PNG) and per-class accuracy (CSV) of a validation or an evaluation."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path
from typing import Any, Sequence

from mlflow.tracking import MlflowClient

from pipeline.tracking.redaction import redact
from pipeline.tracking.runs import log_text


def per_class_rows(confusion: Sequence[Sequence[float]], labels: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for i, row in enumerate(confusion):
        total = int(sum(row))
        correct = int(row[i]) if i < len(row) else 0
        rows.append({"class": i, "label": labels[i] if i < len(labels) else str(i), "videos": total,
                     "correct": correct, "accuracy": round(correct / total, 6) if total else ""})
    return rows


def per_class_csv(confusion: Sequence[Sequence[float]], labels: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["class", "label", "videos", "correct", "accuracy"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(per_class_rows(confusion, labels))
    return buf.getvalue()


def confusion_png(confusion: Sequence[Sequence[float]], labels: Sequence[str], *, title: str) -> bytes:
    """The confusion matrix as a PNG, rows normalised to recall; labels shown up to 40 classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(confusion, dtype=np.float64)
    n = counts.shape[0]
    recall = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.3 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=100)
    image = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 40:
        names = [labels[i] if i < len(labels) else str(i) for i in range(n)]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    if counts[i, j]:
                        ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if recall[i, j] > 0.5 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def log_confusion(client: MlflowClient, run_id: str, confusion: Sequence[Sequence[float]], labels: Sequence[str],
                  *, prefix: str, title: str) -> None:
    """`<prefix>confusion_matrix.png` and `<prefix>per_class_accuracy.csv` as run artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / f"{prefix}confusion_matrix.png"
        png.write_bytes(confusion_png(confusion, labels, title=redact(title)))
        client.log_artifact(run_id, str(png))
    log_text(client, run_id, per_class_csv(confusion, labels), f"{prefix}per_class_accuracy.csv")

