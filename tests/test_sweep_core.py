"""Sweep core: expansion and point hashes, shared silver and scores, vectorised evaluation."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from numpy.lib.recfunctions import structured_to_unstructured

from engine.evaluation import (
    bin_width_ns_of,
    evaluate,
    evaluate_many,
    metrics_of,
    tradable_bins,
)
from engine.signals.registry import (
    ParamSpec,
    ParamValue,
    SignalError,
    SignalInputs,
    get_signal,
    register,
)
from engine.silver import GridConfig, silver_schema
from engine.silver_frame import SilverFrame
from engine.sweep_core import (
    ScoreRequest,
    SweepPoint,
    SweepSpace,
    evaluate_points,
    expand_points,
    run_sweep_core,
    score_key,
)
from tests.test_ml_signals import pressured_market, silver_frame

BIN_NS = 100_000_000


class Momentum:
    """A test signal that does not learn from labels: spot change over ``window`` bins."""

    name = "test_sweep_momentum"
    params: tuple[ParamSpec, ...] = (
        ParamSpec("window", int, 10, minimum=1),
        ParamSpec("scale", float, 1.0),
    )

    def score(self, inputs: SignalInputs, params: Mapping[str, ParamValue]) -> np.ndarray:
        spot = inputs.frame.spot_x2.astype(float)
        window = int(params["window"])
        out = np.full(len(spot), np.nan)
        out[window:] = (spot[window:] - spot[:-window]) * float(params["scale"])
        return out


register(Momentum())


def space(**changes: Any) -> SweepSpace:
    base = SweepSpace(
        datasets=("day1", "day2"),
        signals={
            Momentum.name: {"window": (5, 20), "scale": (0.5,)},
            "ml_linear": {"C": (1.0,)},
        },
        thresholds=(1.0, 2.0, 3.0),
        tp_ticks=(2, 4),
        sl_ticks=(2, 3),
        cooldown_bins=(0, 20),
        max_hold_bins=(100,),
        warmup_bins=(0, 50),
    )
    return dataclasses.replace(base, **changes)


def frames() -> dict[str, SilverFrame]:
    return {
        "day1": silver_frame(*pressured_market(1, 3000)),
        "day2": silver_frame(*pressured_market(2, 2500)),
    }


def same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    matrix_a = structured_to_unstructured(a, dtype=np.float64)
    matrix_b = structured_to_unstructured(b, dtype=np.float64)
    return bool(np.array_equal(matrix_a, matrix_b, equal_nan=True))


# -- expansion and hashes ----------------------------------------------------------------------


def test_expansion_is_the_full_cartesian_product_in_order() -> None:
    points = expand_points(space())
    per_signal_set = 3 * 2 * 2 * 2 * 1 * 2  # thresholds, tp, sl, cooldown, hold, warmup
    assert len(points) == 2 * (2 + 1) * per_signal_set
    assert len({p.point_hash for p in points}) == len(points)
    first = points[0]
    assert (first.dataset, first.signal) == ("day1", Momentum.name)
    assert first.signal_params == (("scale", 0.5), ("window", 5))
    assert (first.threshold, first.tp_ticks, first.sl_ticks) == (1.0, 2, 2)
    assert (first.cooldown_bins, first.max_hold_bins, first.warmup_bins) == (0, 100, 0)
    assert points[1].warmup_bins == 50  # warmup is the innermost axis
    assert points[-1].dataset == "day2"
    # Declared defaults are filled in, so the point names every parameter the score used.
    ml = next(p for p in points if p.signal == "ml_linear")
    names = [name for name, _ in ml.signal_params]
    assert names == sorted(names)
    assert {"C", "train_bins", "embargo_bins", "seed"} <= set(names)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"thresholds": ()}, ValueError, "'thresholds' is empty"),
        ({"tp_ticks": (2, 2)}, ValueError, "'tp_ticks' repeats"),
        ({"datasets": ()}, ValueError, "'datasets' is empty"),
        ({"signals": {}}, ValueError, "'signals' is empty"),
        ({"sl_ticks": (0,)}, ValueError, "EvalParams.sl_ticks"),
        ({"thresholds": (-1.0,)}, ValueError, "EvalParams.threshold"),
        ({"signals": {Momentum.name: {"widow": (3,)}}}, SignalError, "no parameter 'widow'"),
        ({"signals": {Momentum.name: {"window": (2.5,)}}}, SignalError, "expected an integer"),
        ({"signals": {"nope": {}}}, SignalError, "unknown signal 'nope'"),
    ],
)
def test_invalid_axes_are_rejected(
    changes: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        expand_points(space(**changes))


def test_point_hash_is_stable_and_canonical() -> None:
    point = SweepPoint("day1", Momentum.name, (("scale", 0.5), ("window", 5)), 1.0, 2, 2, 0, 100, 0)
    canonical = (
        '{"cooldown_bins":0,"dataset":"day1","max_hold_bins":100,"signal":"test_sweep_momentum",'
        '"signal_params":{"scale":0.5,"window":5},"sl_ticks":2,"threshold":1.0,"tp_ticks":2,'
        '"warmup_bins":0}'
    )
    assert point.point_hash == hashlib.sha256(canonical.encode()).hexdigest()
    # The same point spelled differently (defaults omitted, threshold an int) hashes the same.
    spelled = expand_points(
        space(
            datasets=("day1",),
            signals={Momentum.name: {"window": (5,), "scale": (0.5,)}},
            thresholds=(1,),
            tp_ticks=(2,),
            sl_ticks=(2,),
            cooldown_bins=(0,),
            warmup_bins=(0,),
        )
    )
    assert [p.point_hash for p in spelled] == [point.point_hash]
    for field, value in [
        ("dataset", "day2"),
        ("signal_params", (("scale", 0.5), ("window", 6))),
        ("threshold", 1.5),
        ("tp_ticks", 3),
        ("sl_ticks", 3),
        ("cooldown_bins", 1),
        ("max_hold_bins", 99),
        ("warmup_bins", 1),
    ]:
        changed: dict[str, Any] = {field: value}
        assert dataclasses.replace(point, **changed).point_hash != point.point_hash


# -- vectorised evaluation ---------------------------------------------------------------------


def test_vectorised_points_equal_evaluate_point_by_point() -> None:
    frame = frames()["day1"]
    tradable = tradable_bins(frame)
    tradable[::97] = False
    points = expand_points(
        space(
            datasets=("day1",),
            signals={Momentum.name: {"window": (10,)}},
            thresholds=(0.5, 2.0, 4.0, 6.0),
            tp_ticks=(1, 3, 6),
            sl_ticks=(1, 4),
            cooldown_bins=(0, 7, 40),
            max_hold_bins=(5, 100),
        )
    )
    score = get_signal(Momentum.name).score(SignalInputs(frame, {}), dict(points[0].signal_params))
    rows = evaluate_points(
        score, frame.best_bid_tick, frame.best_ask_tick, tradable, points, BIN_NS
    )
    assert len(rows) == len(points) == 4 * 3 * 2 * 3 * 2 * 2
    assert rows["signals"].sum() > 1000
    for point, row in zip(points, rows, strict=True):
        one = evaluate(
            score, frame.best_bid_tick, frame.best_ask_tick, tradable, point.eval_params, BIN_NS
        )
        assert metrics_of(row) == pytest.approx(one.metrics, rel=0, abs=0, nan_ok=True)


# -- run_sweep_core ----------------------------------------------------------------------------


class Counting:
    """Injected loader and score function that count their calls."""

    def __init__(self) -> None:
        self.frames = frames()
        self.loads: list[str] = []
        self.requests: list[tuple[str, ScoreRequest]] = []

    def load(self, dataset: str) -> SilverFrame:
        self.loads.append(dataset)
        return self.frames[dataset]

    def score(self, frame: SilverFrame, request: ScoreRequest) -> np.ndarray:
        dataset = next(name for name, f in self.frames.items() if f is frame)
        self.requests.append((dataset, request))
        return expected_score(frame, request)


def expected_score(frame: SilverFrame, request: ScoreRequest) -> np.ndarray:
    if request.signal == Momentum.name:
        return get_signal(request.signal).score(SignalInputs(frame, {}), request.params)
    # Stands in for the ML signal (trained elsewhere): a score that depends on the geometry.
    rng = np.random.default_rng([request.tp_ticks, request.sl_ticks, request.max_hold_bins])
    return rng.normal(0, 2, frame.n_bins)


def test_silver_loads_once_per_dataset_and_scores_once_per_key() -> None:
    points = expand_points(space())
    shuffled = [points[i] for i in np.random.default_rng(5).permutation(len(points))]
    counting = Counting()
    result = run_sweep_core(counting.load, counting.score, shuffled)
    assert sorted(counting.loads) == ["day1", "day2"]
    # Per dataset: one score per momentum parameter set (shared by every threshold, TP, SL,
    # cooldown and warmup), and one per TP x SL x hold for the label-learning ML signal.
    keys = [(d, r.signal, tuple(sorted(r.params.items()))) for d, r in counting.requests]
    momentum = [k for k in keys if k[1] == Momentum.name]
    assert len(momentum) == len(set(momentum)) == 2 * 2
    ml = [
        (d, r.tp_ticks, r.sl_ticks, r.max_hold_bins)
        for d, r in counting.requests
        if r.signal == "ml_linear"
    ]
    assert len(ml) == len(set(ml)) == 2 * (2 * 2 * 1)
    assert len({score_key(p) for p in points}) == len(counting.requests)
    # Rows are aligned with the points as given, and equal a direct evaluation.
    assert result.points == tuple(shuffled)
    for point, row in zip(shuffled[:60], result.metrics["all"][:60], strict=True):
        frame = counting.frames[point.dataset]
        request = ScoreRequest(
            point.signal,
            dict(point.signal_params),
            point.tp_ticks,
            point.sl_ticks,
            point.max_hold_bins,
        )
        direct = evaluate(
            expected_score(frame, request),
            frame.best_bid_tick,
            frame.best_ask_tick,
            tradable_bins(frame),
            point.eval_params,
            bin_width_ns_of(frame),
        )
        assert metrics_of(row) == pytest.approx(direct.metrics, rel=0, abs=0, nan_ok=True)


def test_train_and_test_spans_split_each_dataset() -> None:
    points = expand_points(space(signals={Momentum.name: {"window": (5,)}}))
    counting = Counting()
    result = run_sweep_core(counting.load, counting.score, points, train_fraction=0.6)
    assert set(result.metrics) == {"train", "test"}
    assert len(counting.loads) == 2
    for dataset in ("day1", "day2"):
        frame = counting.frames[dataset]
        chosen = [i for i, p in enumerate(points) if p.dataset == dataset]
        request = ScoreRequest(Momentum.name, {"window": 5, "scale": 1.0}, 2, 2, 100)
        score = expected_score(frame, request)
        split = int(frame.n_bins * 0.6)
        for name, span in (("train", slice(0, split)), ("test", slice(split, frame.n_bins))):
            direct = evaluate_many(
                score,
                frame.best_bid_tick,
                frame.best_ask_tick,
                tradable_bins(frame),
                [points[i].eval_params for i in chosen],
                BIN_NS,
                span,
            )
            assert same_rows(result.metrics[name][chosen], direct)
    with pytest.raises(ValueError, match="train_fraction"):
        run_sweep_core(counting.load, counting.score, points, train_fraction=1.0)


def test_a_score_of_the_wrong_length_is_an_error_naming_the_signal() -> None:
    points = expand_points(space(signals={Momentum.name: {"window": (5,)}}))
    counting = Counting()
    with pytest.raises(ValueError, match="'test_sweep_momentum' on dataset 'day1'"):
        run_sweep_core(counting.load, lambda frame, request: np.zeros(3), points)


def test_bin_width_comes_from_the_silver_schema_metadata() -> None:
    config = GridConfig(250_000_000, 256, 40, 250_000_000, "ts_event", 1.0, 0.5, 1.0, 2.0)
    frame = frames()["day1"]
    table = frame.table.replace_schema_metadata(silver_schema(config).metadata)
    assert bin_width_ns_of(SilverFrame(table, frame.tick_size)) == 250_000_000
    with pytest.raises(ValueError, match=r"no qmachina\.grid_config"):
        bin_width_ns_of(SilverFrame(frame.table.replace_schema_metadata({}), frame.tick_size))
