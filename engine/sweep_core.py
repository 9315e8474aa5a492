"""The sweep core: expand sweep axes into points and evaluate them with shared work.

``datasets x signals x cartesian(signal params) x threshold x TP x SL x cooldown x max hold x
warmup`` expands into :class:`SweepPoint` values, each with a stable ``point_hash`` (sha256 of the
point's canonical JSON, signal parameters validated and defaults filled, so two spellings of the
same point share a hash). :func:`run_sweep_core` loads each dataset's silver once, computes each
score once per score key and evaluates all the points sharing it in one compiled pass
(:func:`engine.evaluation.evaluate_many`).

A score key is ``(dataset, signal, signal_params)``; for a signal that learns from the trade
geometry (``learns_labels``, the ML signals: their labels use the point's TP/SL/hold) it also
holds ``(tp_ticks, sl_ticks, max_hold_bins)``, since their score differs per geometry.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import TypeVar

import numpy as np

from engine.evaluation import (
    METRICS_DTYPE,
    EvalParams,
    bin_width_ns_of,
    evaluate_many,
    tradable_bins,
)
from engine.signals.registry import ParamValue, get_signal, validate_params
from engine.silver_frame import SilverFrame

SignalParams = tuple[tuple[str, ParamValue], ...]
AxisValue = TypeVar("AxisValue")


@dataclass(frozen=True)
class SweepPoint:
    """One evaluation of one signal parameter set on one dataset."""

    dataset: str
    signal: str
    signal_params: SignalParams  # sorted by name
    threshold: float
    tp_ticks: int
    sl_ticks: int
    cooldown_bins: int
    max_hold_bins: int
    warmup_bins: int

    @cached_property
    def point_hash(self) -> str:
        """sha256 of the canonical JSON (sorted keys, no spaces) of every field."""
        fields = asdict(self)
        fields["signal_params"] = dict(self.signal_params)
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def eval_params(self) -> EvalParams:
        return EvalParams(
            threshold=self.threshold,
            tp_ticks=self.tp_ticks,
            sl_ticks=self.sl_ticks,
            max_hold_bins=self.max_hold_bins,
            warmup_bins=self.warmup_bins,
            cooldown_bins=self.cooldown_bins,
        )


@dataclass(frozen=True)
class SweepSpace:
    """The axes of a sweep; ``signals`` maps a signal name to its parameter axes."""

    datasets: Sequence[str]
    signals: Mapping[str, Mapping[str, Sequence[ParamValue]]]
    thresholds: Sequence[float]
    tp_ticks: Sequence[int]
    sl_ticks: Sequence[int]
    cooldown_bins: Sequence[int] = (0,)
    max_hold_bins: Sequence[int] = (600,)
    warmup_bins: Sequence[int] = (0,)


def _axis(name: str, values: Sequence[AxisValue]) -> Sequence[AxisValue]:
    if len(values) == 0:
        raise ValueError(f"sweep axis {name!r} is empty")
    if len(set(values)) != len(values):
        raise ValueError(f"sweep axis {name!r} repeats a value: {list(values)}")
    return values


def expand_points(space: SweepSpace) -> list[SweepPoint]:
    """Every point of the space, datasets outermost and warmup innermost; each point valid."""
    geometry = [
        EvalParams(threshold, tp, sl, hold, warmup, cooldown)
        for threshold, tp, sl, cooldown, hold, warmup in itertools.product(
            _axis("thresholds", [float(t) for t in space.thresholds]),
            _axis("tp_ticks", space.tp_ticks),
            _axis("sl_ticks", space.sl_ticks),
            _axis("cooldown_bins", space.cooldown_bins),
            _axis("max_hold_bins", space.max_hold_bins),
            _axis("warmup_bins", space.warmup_bins),
        )
    ]
    _axis("signals", list(space.signals))
    points: list[SweepPoint] = []
    for dataset in _axis("datasets", space.datasets):
        for signal, param_axes in space.signals.items():
            names = sorted(param_axes)
            axes = [_axis(f"{signal}.{name}", param_axes[name]) for name in names]
            for values in itertools.product(*axes):
                params = validate_params(signal, dict(zip(names, values, strict=True)))
                signal_params = tuple(sorted(params.items()))
                points.extend(
                    SweepPoint(
                        dataset,
                        signal,
                        signal_params,
                        g.threshold,
                        g.tp_ticks,
                        g.sl_ticks,
                        g.cooldown_bins,
                        g.max_hold_bins,
                        g.warmup_bins,
                    )
                    for g in geometry
                )
    return points


@dataclass(frozen=True)
class ScoreRequest:
    """What a score function computes: a signal's score, and the geometry its labels use (for a
    signal that does not learn labels, the first point's, which its score ignores)."""

    signal: str
    params: Mapping[str, ParamValue]
    tp_ticks: int
    sl_ticks: int
    max_hold_bins: int


FrameLoader = Callable[[str], SilverFrame]
ScoreFn = Callable[[SilverFrame, ScoreRequest], np.ndarray]


def _learns_labels(signal: str) -> bool:
    return bool(getattr(get_signal(signal), "learns_labels", False))


def score_key(point: SweepPoint) -> tuple[object, ...]:
    """The points with one score key share one score computation."""
    key: tuple[object, ...] = (point.dataset, point.signal, point.signal_params)
    if _learns_labels(point.signal):
        key += (point.tp_ticks, point.sl_ticks, point.max_hold_bins)
    return key


def evaluate_points(
    score: np.ndarray,
    best_bid_tick: np.ndarray,
    best_ask_tick: np.ndarray,
    tradable: np.ndarray,
    points: Sequence[SweepPoint],
    bin_width_ns: int,
    span: slice | None = None,
) -> np.ndarray:
    """``METRICS_DTYPE`` rows of the points over one score (see ``evaluate_many``)."""
    return evaluate_many(
        score,
        best_bid_tick,
        best_ask_tick,
        tradable,
        [p.eval_params for p in points],
        bin_width_ns,
        span,
    )


@dataclass(frozen=True)
class SweepCoreResult:
    """Metrics rows aligned with ``points``, per span: ``"all"``, or ``"train"`` and ``"test"``."""

    points: tuple[SweepPoint, ...]
    metrics: dict[str, np.ndarray]


def run_sweep_core(
    frame_loader: FrameLoader,
    score_fn: ScoreFn,
    points: Sequence[SweepPoint],
    *,
    train_fraction: float | None = None,
) -> SweepCoreResult:
    """Evaluate ``points``: ``frame_loader(dataset)`` once per dataset (one frame held at a
    time), ``score_fn`` once per :func:`score_key`, one compiled pass per score.

    With ``train_fraction`` each dataset is split at bin ``int(n * train_fraction)`` and every
    point is reported on both spans (``evaluate_many``'s span rules), so a caller can choose on
    ``"train"`` and report on ``"test"``.
    """
    if train_fraction is not None and not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    by_dataset: dict[str, dict[tuple[object, ...], list[int]]] = {}
    for index, point in enumerate(points):
        by_dataset.setdefault(point.dataset, {}).setdefault(score_key(point), []).append(index)
    span_names = ("all",) if train_fraction is None else ("train", "test")
    metrics = {name: np.zeros(len(points), dtype=METRICS_DTYPE) for name in span_names}
    for dataset, groups in by_dataset.items():
        frame = frame_loader(dataset)
        tradable = tradable_bins(frame)
        bin_width_ns = bin_width_ns_of(frame)
        spans: dict[str, slice | None] = {"all": None}
        if train_fraction is not None:
            split = int(frame.n_bins * train_fraction)
            spans = {"train": slice(0, split), "test": slice(split, frame.n_bins)}
        for indices in groups.values():
            first = points[indices[0]]
            score = score_fn(
                frame,
                ScoreRequest(
                    first.signal,
                    dict(first.signal_params),
                    first.tp_ticks,
                    first.sl_ticks,
                    first.max_hold_bins,
                ),
            )
            if np.shape(score) != (frame.n_bins,):
                raise ValueError(
                    f"signal {first.signal!r} on dataset {dataset!r} returned a score of shape "
                    f"{np.shape(score)}; expected ({frame.n_bins},)"
                )
            group = [points[i] for i in indices]
            for name, span in spans.items():
                metrics[name][indices] = evaluate_points(
                    score,
                    frame.best_bid_tick,
                    frame.best_ask_tick,
                    tradable,
                    group,
                    bin_width_ns,
                    span,
                )
        del frame  # released before the next dataset's silver loads
    return SweepCoreResult(tuple(points), metrics)
