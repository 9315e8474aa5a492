"""ML signals: walk-forward purge/embargo, out-of-sample scores, causality, typed parameters."""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pytest

from engine.evaluation import outcome_labels, tradable_bins
from engine.signals.ml import (
    direction_labels,
    silver_features,
    walk_forward_folds,
    walk_forward_scores,
)
from engine.signals.registry import (
    ParamValue,
    SignalError,
    SignalInputs,
    get_signal,
    validate_params,
)
from engine.silver_frame import SilverFrame

TICK = 250_000_000
RADIUS = 4  # ticks of the window beyond each touch
BIN_NS = 100_000_000
N_BASE_FEATURES = 8
SMALL = {"train_bins": 1000, "test_bins": 500, "embargo_bins": 50}
FAST_GBM = {**SMALL, "max_iter": 30, "min_samples_leaf": 20}


def silver_frame(
    bid: np.ndarray, ask: np.ndarray, imbalance: np.ndarray, valid: np.ndarray | None = None
) -> SilverFrame:
    """A minimal silver table: the BBO, validity, and a window of ``RADIUS`` ticks beyond each
    touch holding resting depth split by ``imbalance`` in [-1, 1] (add/pull mass: the same)."""
    n = len(bid)
    first = bid - RADIUS + 1
    count = ask + RADIUS - first
    offsets = np.concatenate(([0], np.cumsum(count))).astype(np.int32)
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], count)
    tick = np.repeat(first, count) + within
    share = np.repeat(imbalance, count)
    bid_depth = np.where(tick <= np.repeat(bid, count), np.rint(100 * (1 + share)), 0)
    ask_depth = np.where(tick >= np.repeat(ask, count), np.rint(100 * (1 - share)), 0)

    def lists(values: np.ndarray, dtype: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=dtype))

    table = pa.table(
        {
            "bin_start_ns": pa.array(np.arange(n, dtype=np.int64) * BIN_NS),
            "book_valid": pa.array(np.ones(n, bool) if valid is None else valid),
            "best_bid": pa.array(bid * TICK),
            "best_ask": pa.array(ask * TICK),
            "spot_x2_ticks": pa.array(bid + ask),
            "window_first_tick": pa.array(first),
            "window_ticks": pa.array(count.astype(np.int32)),
            "bid_depth": lists(bid_depth, pa.int32()),
            "ask_depth": lists(ask_depth, pa.int32()),
            "add_mass": lists(bid_depth + ask_depth, pa.float32()),
            "pull_mass": lists(ask_depth, pa.float32()),
        }
    ).replace_schema_metadata({"qmachina.grid_config": json.dumps({"bin_width_ns": BIN_NS})})
    return SilverFrame(table, TICK)


def pressured_market(seed: int, n: int = 4000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A market pushed by a hidden pressure, a random sign per block of 40 bins, that the depth
    imbalance shows (noisily) at the same bin: a causal, learnable edge."""
    rng = np.random.default_rng(seed)
    pressure = np.repeat(rng.choice([-1.0, 1.0], n // 40 + 1), 40)[:n]
    moves = rng.random(n) < 0.3
    direction = np.where(rng.random(n) < 0.85, pressure, -pressure)
    bid = 4000 + np.cumsum(np.where(moves, direction, 0.0)).astype(np.int64)
    ask = bid + 1 + (rng.random(n) < 0.1)
    imbalance = np.clip(0.5 * pressure + rng.normal(0, 0.3, n), -1, 1)
    return bid, ask, imbalance


def inputs(frame: SilverFrame, **geometry: int) -> SignalInputs:
    return SignalInputs(
        frame,
        {},
        tp_ticks=geometry.get("tp", 3),
        sl_ticks=geometry.get("sl", 3),
        max_hold_bins=geometry.get("hold", 150),
    )


def labels_of(frame: SilverFrame, tp: int = 3, sl: int = 3, hold: int = 150) -> np.ndarray:
    long, short, _ = outcome_labels(
        frame.best_bid_tick, frame.best_ask_tick, tradable_bins(frame), tp, sl, hold
    )
    return direction_labels(long, short)


@pytest.fixture(scope="module")
def market() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return pressured_market(1)


# -- registry ----------------------------------------------------------------------------------


def test_registered_with_typed_walk_forward_and_model_params() -> None:
    for name, model_params in (
        ("ml_linear", {"C", "max_iter"}),
        ("ml_gbm", {"max_iter", "learning_rate", "max_leaf_nodes", "min_samples_leaf"}),
    ):
        declared = {p.name: p for p in get_signal(name).params}
        walk_forward = {"train_bins", "test_bins", "purge_bins", "embargo_bins", "seed"}
        assert walk_forward | model_params <= set(declared)
        assert declared["train_bins"].kind is int
        checked = validate_params(name, {"train_bins": 2000})
        assert checked["train_bins"] == 2000
        assert checked["seed"] == declared["seed"].default


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("ml_gbm", {"n_estimators": 10}, "no parameter 'n_estimators'"),
        ("ml_linear", {"learning_rate": 0.1}, "no parameter 'learning_rate'"),
        ("ml_linear", {"train_bins": 1500.0}, "'train_bins': expected an integer"),
        ("ml_gbm", {"learning_rate": "fast"}, "'learning_rate': expected a number"),
        ("ml_gbm", {"seed": True}, "'seed': expected an integer"),
        ("ml_linear", {"purge_bins": -1}, "'purge_bins': -1 is below the minimum"),
        ("ml_gbm", {"train_bins": 10}, "'train_bins': 10 is below the minimum"),
    ],
)
def test_unknown_or_ill_typed_params_are_rejected(
    name: str, params: Mapping[str, object], message: str
) -> None:
    with pytest.raises(SignalError, match=message):
        validate_params(name, params)


def test_score_rejects_bad_params_before_training(
    market: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    frame = silver_frame(*market)
    with pytest.raises(SignalError, match="no parameter 'depth'"):
        get_signal("ml_linear").score(inputs(frame), {"depth": 3})


# -- walk-forward ------------------------------------------------------------------------------


@pytest.mark.parametrize(("purge", "embargo"), [(0, 0), (0, 50), (40, 0), (25, 75)])
def test_folds_purge_and_embargo_keep_labels_out_of_the_test_fold(
    market: tuple[np.ndarray, np.ndarray, np.ndarray], purge: int, embargo: int
) -> None:
    bid, ask, _ = market
    n = len(bid)
    tradable = np.ones(n, bool)
    tradable[::37] = False
    _, _, label_end = outcome_labels(bid, ask, tradable, 3, 3, 150)
    folds = walk_forward_folds(label_end, 1000, 500, purge, embargo)
    assert folds[0].test_start == 1000 + embargo
    assert [f.test_start for f in folds[1:]] == [f.test_stop for f in folds[:-1]]
    assert folds[-1].test_stop == n
    purged = 0
    for fold in folds:
        rows = fold.train_rows
        cutoff = fold.test_start - embargo
        window = np.arange(cutoff - 1000, cutoff)
        assert rows.min() >= cutoff - 1000
        assert rows.max() < cutoff
        # No training label window [i, label_end[i]] reaches the embargo or the test fold.
        assert (label_end[rows] >= rows).all()
        assert label_end[rows].max() < cutoff - purge
        assert not ((rows <= fold.test_stop - 1) & (label_end[rows] >= fold.test_start)).any()
        # Exactly the resolved, tradable bins of the window are kept.
        expected = window[(label_end[window] >= 0) & (label_end[window] < cutoff - purge)]
        assert np.array_equal(rows, expected)
        purged += len(window) - len(rows)
    assert purged > 0  # the labels are long enough for the purge to bite


class SpyModel:
    """Records the bins it was trained on (feature column 0 is the bin index)."""

    fitted: list[np.ndarray]

    def __init__(self, fitted: list[np.ndarray]) -> None:
        self.fitted = fitted
        self.classes_ = np.array([-1, 0, 1])

    def fit(self, x: np.ndarray, y: np.ndarray) -> SpyModel:
        self.fitted.append(x[:, 0].astype(np.int64))
        self.classes_ = np.unique(y)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        proba = np.zeros((len(x), len(self.classes_)))
        proba[:, -1] = 1.0
        return proba


def test_each_fold_scores_with_a_model_trained_on_its_rows_only() -> None:
    n = 3000
    rng = np.random.default_rng(2)
    label_end = np.minimum(np.arange(n) + rng.integers(1, 120, n), n - 1)
    label_end[::50] = -1
    labels = rng.integers(-1, 2, n).astype(np.int8)
    labels[1550:2350] = 1  # the fold trained on bins 1600..2299 sees one class only
    features = np.column_stack([np.arange(n, dtype=float), rng.normal(size=n)])
    features[::7, 1] = np.nan
    folds = walk_forward_folds(label_end, 700, 400, 10, 30)
    fitted: list[np.ndarray] = []
    scores = walk_forward_scores(features, labels, folds, lambda: SpyModel(fitted))
    trained = [f for f in folds if len(np.unique(labels[f.train_rows])) > 1]
    assert len(fitted) == len(trained) < len(folds)
    for rows, fold in zip(fitted, trained, strict=True):
        assert np.array_equal(rows, fold.train_rows[np.isfinite(features[fold.train_rows, 1])])
    assert np.isnan(scores[: folds[0].test_start]).all()
    for fold in folds:
        span = scores[fold.test_start : fold.test_stop]
        finite = np.isfinite(features[fold.test_start : fold.test_stop, 1])
        if fold in trained:
            assert (span[finite] == 1.0).all()  # P(+1) - P(-1) of the spy
            assert np.isnan(span[~finite]).all()
        else:
            assert np.isnan(span).all()


@pytest.mark.parametrize(("name", "params"), [("ml_linear", SMALL), ("ml_gbm", FAST_GBM)])
def test_scores_are_out_of_sample_and_learn_a_causal_edge(
    market: tuple[np.ndarray, np.ndarray, np.ndarray],
    name: str,
    params: Mapping[str, ParamValue],
) -> None:
    frame = silver_frame(*market)
    scores = get_signal(name).score(inputs(frame), params)
    assert scores.shape == (frame.n_bins,)
    assert scores.dtype == np.float64
    first_test = 1000 + 50
    assert np.isnan(scores[:first_test]).all()
    assert np.isfinite(scores[first_test:]).mean() > 0.99
    assert -1.0 <= np.nanmin(scores) < np.nanmax(scores) <= 1.0
    labels = labels_of(frame)[first_test:]
    edge = np.corrcoef(scores[first_test:], labels)[0, 1]
    assert edge > 0.4
    # Control: the same market with an uninformative imbalance (momentum alone still helps).
    bid, ask, imbalance = market
    noise = np.random.default_rng(0).uniform(-1, 1, len(imbalance))
    control = get_signal(name).score(inputs(silver_frame(bid, ask, noise)), params)
    assert edge > np.corrcoef(control[first_test:], labels)[0, 1] + 0.08


@pytest.mark.parametrize(("name", "params"), [("ml_linear", SMALL), ("ml_gbm", FAST_GBM)])
def test_planted_future_never_changes_earlier_scores(
    market: tuple[np.ndarray, np.ndarray, np.ndarray],
    name: str,
    params: Mapping[str, ParamValue],
) -> None:
    bid, ask, imbalance = market
    n = len(bid)
    cut = 2300  # inside the third test fold; later folds train on bins before the cut too
    rng = np.random.default_rng(9)
    bid2 = bid.copy()
    bid2[cut:] = bid[cut:] + np.cumsum(rng.integers(-3, 4, n - cut))
    ask2 = bid2 + 1
    ask2[:cut] = ask[:cut]
    imbalance2 = imbalance.copy()
    imbalance2[cut:] = -imbalance[cut:]  # the edge reverses in the future
    signal = get_signal(name)
    before = signal.score(inputs(silver_frame(bid, ask, imbalance)), params)
    after = signal.score(inputs(silver_frame(bid2, ask2, imbalance2)), params)
    np.testing.assert_array_equal(before[:cut], after[:cut])
    assert not np.array_equal(before[cut:], after[cut:], equal_nan=True)


def test_labels_follow_the_experiment_geometry(
    market: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    frame = silver_frame(*market)
    signal = get_signal("ml_linear")
    near = signal.score(inputs(frame, tp=2, sl=2, hold=60), SMALL)
    far = signal.score(inputs(frame, tp=8, sl=4, hold=400), SMALL)
    assert not np.allclose(near[1050:], far[1050:])


# -- features ----------------------------------------------------------------------------------


def test_features_are_causal_and_read_gold(
    market: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    bid, ask, imbalance = market
    frame = silver_frame(bid, ask, imbalance)
    base = silver_features(frame, {}, 3)
    assert base.shape == (frame.n_bins, N_BASE_FEATURES)
    # Depth imbalance over the 3 levels from the touch: (100(1+x) - 100(1-x)) / 200 = x (rounded).
    np.testing.assert_allclose(base[:, 5], imbalance, atol=0.01)
    assert (base[:, 0] == ask - bid).all()
    series = np.arange(frame.n_bins, dtype=float)
    grid = np.full((frame.n_bins, frame.n_ticks), np.nan)
    columns = np.arange(frame.n_ticks) + frame.first_tick
    grid[:] = np.where(columns[None, :] <= bid[:, None], 1.0, 2.0)
    with_gold = silver_features(frame, {"b_series": series, "a_grid": grid}, 3)
    assert with_gold.shape[1] == N_BASE_FEATURES + 3
    assert (with_gold[:, N_BASE_FEATURES] == 1.0).all()  # a_grid bid side (names sorted)
    assert (with_gold[:, N_BASE_FEATURES + 1] == 2.0).all()  # a_grid ask side
    assert (with_gold[:, N_BASE_FEATURES + 2] == series).all()
    with pytest.raises(ValueError, match="gold output 'bad' has shape"):
        silver_features(frame, {"bad": np.zeros(3)}, 3)
    cut = 1500
    changed = silver_frame(
        np.concatenate([bid[:cut], bid[cut:] + 7]),
        np.concatenate([ask[:cut], ask[cut:] + 9]),
        np.concatenate([imbalance[:cut], -imbalance[cut:]]),
    )
    np.testing.assert_array_equal(silver_features(changed, {}, 3)[:cut], base[:cut])


def test_bins_without_a_book_carry_the_last_bbo(
    market: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    bid, ask, imbalance = market
    valid = np.ones(len(bid), bool)
    valid[200:210] = False
    frame = silver_frame(bid, ask, imbalance, valid)
    spread = silver_features(frame, {}, 3)[:, 0]
    assert (spread[200:210] == ask[199] - bid[199]).all()
    valid[:5] = False
    early = silver_features(silver_frame(bid, ask, imbalance, valid), {}, 3)
    assert np.isnan(early[:5, 0]).all()
