"""The promotion gate's statistics: a paired comparison of two prediction tables.

Why McNemar's exact test rather than a paired bootstrap: each video is either right or wrong for
each model, and both models see the same videos, so all the evidence about "which is better" lies
in the discordant videos (right for one model, wrong for the other). Under "no difference" each
discordant video is a fair coin, so the one-sided p-value is an exact binomial tail: no sampling,
no seed, the same answer on every rerun (the decision is recorded and must be reproducible), and
valid on the few dozen videos of a small evaluation set where a bootstrap's interval is coarse.
One-sided because the gate asks "is the challenger better", never "are they different".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa
from scipy.stats import binomtest

from pipeline.tracking.predictions import key_of

TEST = "mcnemar_exact_one_sided"
METRICS = {"eval_top1": "correct", "eval_top5": "top5_correct"}


class GateError(ValueError):
    """The two tables cannot be compared; the message says why."""


def mcnemar_exact_p(challenger_only: int, champion_only: int) -> float:
    """P(at least `challenger_only` of the discordant videos favour the challenger | no difference):
    the upper tail of Binomial(challenger_only + champion_only, 1/2). 1.0 with no discordant video.
    scipy's tail rather than a sum of binomial coefficients: the exact integer sum takes seconds at
    ten thousand discordant videos, a large but ordinary evaluation set."""
    n = challenger_only + champion_only
    if n == 0:
        return 1.0  # binomtest wants at least one trial
    return float(binomtest(challenger_only, n, 0.5, alternative="greater").pvalue)


@dataclass(frozen=True)
class PairedResult:
    metric: str
    paired_videos: int  # usable in both tables
    challenger_value: float  # the metric on the paired videos
    champion_value: float
    challenger_only: int  # right for the challenger only
    champion_only: int
    p_value: float
    test: str = TEST

    def as_dict(self) -> dict:
        return asdict(self)


def compare(challenger: pa.Table, champion: pa.Table, *, metric: str = "eval_top1") -> PairedResult:
    """The two models on the videos both could score, under one evidence key (else GateError)."""
    if metric not in METRICS:
        raise GateError(f"the paired test compares {', '.join(METRICS)}, not {metric!r}")
    a, b = key_of(challenger), key_of(champion)
    if a != b:
        raise GateError(f"the challenger was measured on {a} but the champion on {b}; compare them on one "
                        "manifest, split and number of views")
    column = METRICS[metric]

    def usable(table: pa.Table) -> dict[int, bool]:
        return {v: c for v, c, s in zip(*(table.column(n).to_pylist() for n in ("video_id", column, "status")))
                if s == "ok"}

    ours, theirs = usable(challenger), usable(champion)
    both = sorted(ours.keys() & theirs.keys())
    if not both:
        raise GateError(f"no video on {a} was scored by both models; nothing to compare")
    challenger_only = sum(ours[v] and not theirs[v] for v in both)
    champion_only = sum(theirs[v] and not ours[v] for v in both)
    return PairedResult(metric=metric, paired_videos=len(both),
                        challenger_value=sum(ours[v] for v in both) / len(both),
                        champion_value=sum(theirs[v] for v in both) / len(both),
                        challenger_only=challenger_only, champion_only=champion_only,
                        p_value=mcnemar_exact_p(challenger_only, champion_only))


def decide(result: PairedResult, *, confidence: float, min_delta: float) -> tuple[bool, str]:
    """(promote?, why): better with p <= 1 - confidence AND by at least min_delta. A tie never promotes
    (equal discordant counts give p >= 0.5, and a zero difference is not "better")."""
    delta = result.challenger_value - result.champion_value
    alpha = 1.0 - confidence
    figures = (f"{result.metric} {result.challenger_value:.4f} vs {result.champion_value:.4f} on "
               f"{result.paired_videos} paired videos ({result.challenger_only} right only for the challenger, "
               f"{result.champion_only} only for the champion), one-sided McNemar p={result.p_value:.4g}")
    if delta <= 0:
        return False, f"not better: {figures}"
    if result.p_value > alpha:
        return False, f"not significant at confidence {confidence}: {figures} > {alpha:.4g}"
    if delta < min_delta:
        return False, f"better by {delta:.4f} < min_delta {min_delta}: {figures}"
    return True, f"better at confidence {confidence}: {figures} <= {alpha:.4g}, delta {delta:.4f} >= {min_delta}"
