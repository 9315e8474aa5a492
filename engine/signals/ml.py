"""ML signals: scikit-learn classifiers trained walk-forward on the experiment's own TP/SL labels.

**Label** of bin t (:func:`direction_labels`): +1 when a long entered at t (at the ask) reaches its
take-profit and a short does not, -1 the mirror, 0 otherwise (both stopped or timed out, or both
hit), resolved by :func:`engine.evaluation.outcome_labels` with ``SignalInputs.tp_ticks``,
``sl_ticks`` and ``max_hold_bins``. **Score** of bin t: ``P(+1) - P(-1)`` from the fold's model,
in ``[-1, 1]``.

**Features** of bin t read silver bins ``<= t`` only (:func:`silver_features`); the BBO is carried
forward over bins without one:

* spread in ticks; mid change over the last 1, 10 and 100 bins; realised volatility (root mean
  square of one-bin mid changes over the last 100 bins);
* imbalance ``(bid - ask) / (bid + ask)`` over the ``depth_ticks`` levels from the touch of the
  silver per-tick fields ``bid_depth``/``ask_depth`` (resting depth) and of ``add_mass`` and
  ``pull_mass`` (bid side: the best bid and the ticks below it, ask side: the best ask and above);
* every gold output in ``SignalInputs.gold``, in name order: a ``[n_bins]`` series as it is, a
  ``[n_bins, n_ticks]`` grid as the mean of its finite cells over the bid-side and over the
  ask-side levels, as above (two features).

**Walk-forward** (:func:`walk_forward_folds`): test folds of ``test_bins`` bins tile
``[train_bins + embargo_bins, n)``. For the fold starting at bin ``a`` the cut-off is
``c = a - embargo_bins``; the model is trained on the bins ``i`` in ``[c - train_bins, c)`` whose
label window closed ``purge_bins`` before the cut-off (``label_end_bin[i] < c - purge_bins``;
the others are purged) and whose features are finite. No training label reads a bin of the
embargo or of the test fold, so every score is out-of-sample; bins before the first fold, and
folds whose training bins hold fewer than two label classes, are NaN. Scaling (linear model) is
fitted on the fold's training bins only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier  # type: ignore[import-untyped]
from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]
from sklearn.pipeline import make_pipeline  # type: ignore[import-untyped]
from sklearn.preprocessing import StandardScaler  # type: ignore[import-untyped]
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from engine.evaluation import OUTCOME_TP, outcome_labels, tradable_bins
from engine.signals.registry import ParamSpec, ParamValue, SignalInputs, register, validate_params
from engine.silver_frame import SilverFrame

MID_CHANGE_WINDOWS = (1, 10, 100)
VOLATILITY_WINDOW = 100
# (bid-side field, ask-side field): the flow masses carry no side, the touch decides it.
IMBALANCE_FIELDS = (
    ("bid_depth", "ask_depth"),
    ("add_mass", "add_mass"),
    ("pull_mass", "pull_mass"),
)


class Classifier(Protocol):
    """What a walk-forward model must do (the scikit-learn classifier interface)."""

    classes_: np.ndarray

    def fit(self, x: np.ndarray, y: np.ndarray) -> Any: ...

    def predict_proba(self, x: np.ndarray) -> np.ndarray: ...


# -- features ----------------------------------------------------------------------------------


def _carried_bbo(frame: SilverFrame) -> tuple[np.ndarray, np.ndarray]:
    """Best bid/ask ticks as float64, carried forward over bins without a tradable BBO."""
    tradable = tradable_bins(frame)
    last = np.where(tradable, np.arange(frame.n_bins), -1)
    np.maximum.accumulate(last, out=last)
    bid = np.where(last >= 0, frame.best_bid_tick[np.maximum(last, 0)], np.nan).astype(np.float64)
    ask = np.where(last >= 0, frame.best_ask_tick[np.maximum(last, 0)], np.nan).astype(np.float64)
    return bid, ask


def _lagged_change(values: np.ndarray, lag: int) -> np.ndarray:
    out = np.full(len(values), np.nan)
    out[lag:] = values[lag:] - values[:-lag]
    return out


def _trailing_rms(values: np.ndarray, window: int) -> np.ndarray:
    """Root mean square of the finite values among the last ``window`` bins (NaN if none)."""
    finite = np.isfinite(values)
    sums = np.concatenate(([0.0], np.cumsum(np.where(finite, values * values, 0.0))))
    counts = np.concatenate(([0], np.cumsum(finite)))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    n = counts[ends] - counts[starts]
    total = sums[ends] - sums[starts]
    mean_square = np.divide(total, n, out=np.full(len(values), np.nan), where=n > 0)
    return np.asarray(np.sqrt(mean_square))


def _touch_side_sums(
    grid: np.ndarray, touch: np.ndarray, first_tick: int, step: int, levels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sum and count of the finite cells of ``grid`` at ticks ``touch + step * d``, d < levels."""
    n_bins, n_ticks = grid.shape
    if n_ticks == 0:
        return np.zeros(n_bins), np.zeros(n_bins, dtype=np.int64)
    valid_touch = np.isfinite(touch)
    columns = np.where(valid_touch, touch, first_tick - 1).astype(np.int64) - first_tick
    columns = columns[:, None] + step * np.arange(levels)[None, :]
    inside = (columns >= 0) & (columns < n_ticks) & valid_touch[:, None]
    cells = grid[np.arange(n_bins)[:, None], np.clip(columns, 0, n_ticks - 1)]
    finite = inside & np.isfinite(cells)
    return np.where(finite, cells, 0.0).sum(axis=1), finite.sum(axis=1)


def _imbalance(bid_side: np.ndarray, ask_side: np.ndarray, defined: np.ndarray) -> np.ndarray:
    """``(bid - ask) / (bid + ask)``; 0 when both are 0, NaN where not ``defined``."""
    total = bid_side + ask_side
    ratio = np.divide(bid_side - ask_side, total, out=np.zeros(len(total)), where=total != 0)
    return np.where(defined, ratio, np.nan)


def silver_features(
    frame: SilverFrame, gold: Mapping[str, np.ndarray], depth_ticks: int
) -> np.ndarray:
    """The causal feature matrix ``[n_bins, n_features]`` (columns in the module docstring)."""
    if frame.n_bins == 0:
        raise ValueError("silver frame has no bins")
    bid, ask = _carried_bbo(frame)
    mid = (bid + ask) / 2.0
    columns = [ask - bid]
    columns += [_lagged_change(mid, lag) for lag in MID_CHANGE_WINDOWS]
    columns.append(_trailing_rms(_lagged_change(mid, 1), VOLATILITY_WINDOW))
    for bid_field, ask_field in IMBALANCE_FIELDS:
        bid_sum, bid_count = _touch_side_sums(
            frame.field(bid_field), bid, frame.first_tick, -1, depth_ticks
        )
        ask_sum, ask_count = _touch_side_sums(
            frame.field(ask_field), ask, frame.first_tick, 1, depth_ticks
        )
        columns.append(_imbalance(bid_sum, ask_sum, (bid_count > 0) & (ask_count > 0)))
    for name in sorted(gold):
        values = np.asarray(gold[name], dtype=np.float64)
        if values.shape == (frame.n_bins,):
            columns.append(values)
        elif values.shape == (frame.n_bins, frame.n_ticks):
            for touch, step in ((bid, -1), (ask, 1)):
                total, count = _touch_side_sums(values, touch, frame.first_tick, step, depth_ticks)
                columns.append(
                    np.divide(total, count, out=np.full(frame.n_bins, np.nan), where=count > 0)
                )
        else:
            raise ValueError(
                f"gold output {name!r} has shape {values.shape}; expected ({frame.n_bins},) or "
                f"({frame.n_bins}, {frame.n_ticks})"
            )
    return np.column_stack(columns)


# -- labels and walk-forward -------------------------------------------------------------------


def direction_labels(long_outcome: np.ndarray, short_outcome: np.ndarray) -> np.ndarray:
    """+1 where only the long reaches TP, -1 where only the short does, else 0 (int8)."""
    long_wins = long_outcome == OUTCOME_TP
    short_wins = short_outcome == OUTCOME_TP
    up = (long_wins & ~short_wins).astype(np.int8)
    return np.asarray(up - (short_wins & ~long_wins).astype(np.int8))


@dataclass(frozen=True)
class Fold:
    """One walk-forward step: the test bins ``[test_start, test_stop)`` and the training bins."""

    test_start: int
    test_stop: int
    train_rows: np.ndarray  # int64 bin indices, ascending


def walk_forward_folds(
    label_end_bin: np.ndarray,
    train_bins: int,
    test_bins: int,
    purge_bins: int,
    embargo_bins: int,
) -> list[Fold]:
    """The folds over ``len(label_end_bin)`` bins (scheme in the module docstring)."""
    if train_bins < 1 or test_bins < 1 or purge_bins < 0 or embargo_bins < 0:
        raise ValueError(
            f"need train_bins, test_bins >= 1 and purge_bins, embargo_bins >= 0; got "
            f"{train_bins}, {test_bins}, {purge_bins}, {embargo_bins}"
        )
    n = len(label_end_bin)
    folds = []
    for test_start in range(train_bins + embargo_bins, n, test_bins):
        cutoff = test_start - embargo_bins
        rows = np.arange(cutoff - train_bins, cutoff)
        ends = label_end_bin[rows]
        # label_end_bin is -1 where no trade could enter: no label to learn from.
        keep = (ends >= 0) & (ends < cutoff - purge_bins)
        folds.append(Fold(test_start, min(test_start + test_bins, n), rows[keep]))
    return folds


def walk_forward_scores(
    features: np.ndarray,
    labels: np.ndarray,
    folds: list[Fold],
    make_model: Callable[[], Classifier],
) -> np.ndarray:
    """Out-of-sample ``P(+1) - P(-1)`` per bin: each fold's model scores that fold's bins."""
    scores = np.full(len(features), np.nan)
    finite = np.isfinite(features).all(axis=1)
    for fold in folds:
        rows = fold.train_rows[finite[fold.train_rows]]
        if len(np.unique(labels[rows])) < 2:
            continue
        model = make_model()
        # Fold-sized fits are too small for OpenMP: on the 2-core reference machine one thread
        # fits the default gradient-boosted model on 6,000 bins in 0.25 s, two threads in 2 to 5 s.
        with threadpool_limits(limits=1, user_api="openmp"):
            model.fit(features[rows], labels[rows])
        test = np.arange(fold.test_start, fold.test_stop)
        test = test[finite[test]]
        if len(test) == 0:
            continue
        proba = model.predict_proba(features[test])
        classes = list(model.classes_)
        up = proba[:, classes.index(1)] if 1 in classes else 0.0
        down = proba[:, classes.index(-1)] if -1 in classes else 0.0
        scores[test] = up - down
    return scores


# -- the registered signals --------------------------------------------------------------------

WALK_FORWARD_PARAMS = (
    ParamSpec("train_bins", int, 6000, minimum=100, doc="bins each fold's model is trained on"),
    ParamSpec("test_bins", int, 1200, minimum=1, doc="bins each fold's model scores"),
    ParamSpec(
        "purge_bins",
        int,
        0,
        minimum=0,
        doc="a training label must have closed this many bins before the embargo",
    ),
    ParamSpec(
        "embargo_bins",
        int,
        100,
        minimum=0,
        doc="untrained bins between training and the test fold (default: longest feature window)",
    ),
    ParamSpec("seed", int, 0, minimum=0, maximum=2**32 - 1, doc="model random state"),
    ParamSpec(
        "depth_ticks", int, 5, minimum=1, maximum=200, doc="levels from the touch in imbalances"
    ),
)


class WalkForwardSignal:
    """A classifier scored out-of-sample by walk-forward training on TP/SL labels."""

    # The score depends on the trade geometry in SignalInputs: a sweep may not share it across
    # TP/SL/hold values (engine.sweep_core reads this flag).
    learns_labels = True

    def __init__(
        self,
        name: str,
        model_params: tuple[ParamSpec, ...],
        make_model: Callable[[Mapping[str, ParamValue]], Classifier],
    ) -> None:
        self.name = name
        self.params = WALK_FORWARD_PARAMS + model_params
        self._make_model = make_model

    def score(self, inputs: SignalInputs, params: Mapping[str, ParamValue]) -> np.ndarray:
        checked = validate_params(self.name, params)
        frame = inputs.frame
        long_outcome, short_outcome, label_end_bin = outcome_labels(
            frame.best_bid_tick,
            frame.best_ask_tick,
            tradable_bins(frame),
            inputs.tp_ticks,
            inputs.sl_ticks,
            inputs.max_hold_bins,
        )
        folds = walk_forward_folds(
            label_end_bin,
            int(checked["train_bins"]),
            int(checked["test_bins"]),
            int(checked["purge_bins"]),
            int(checked["embargo_bins"]),
        )
        features = silver_features(frame, inputs.gold, int(checked["depth_ticks"]))
        return walk_forward_scores(
            features,
            direction_labels(long_outcome, short_outcome),
            folds,
            lambda: self._make_model(checked),
        )


def _linear_model(params: Mapping[str, ParamValue]) -> Classifier:
    model: Classifier = make_pipeline(
        StandardScaler(),
        LogisticRegression(
            C=float(params["C"]), max_iter=int(params["max_iter"]), random_state=int(params["seed"])
        ),
    )
    return model


def _gbm_model(params: Mapping[str, ParamValue]) -> Classifier:
    model: Classifier = HistGradientBoostingClassifier(
        max_iter=int(params["max_iter"]),
        learning_rate=float(params["learning_rate"]),
        max_leaf_nodes=int(params["max_leaf_nodes"]),
        min_samples_leaf=int(params["min_samples_leaf"]),
        l2_regularization=float(params["l2_regularization"]),
        # Early stopping would hold out a shuffled slice of the training bins for validation,
        # mixing time inside the fold; every training bin is fitted instead.
        early_stopping=False,
        random_state=int(params["seed"]),
    )
    return model


ml_linear = register(
    WalkForwardSignal(
        "ml_linear",
        (
            ParamSpec("C", float, 1.0, minimum=1e-6, maximum=1e6, doc="inverse L2 strength"),
            ParamSpec("max_iter", int, 200, minimum=10, maximum=10_000, doc="solver iterations"),
        ),
        _linear_model,
    )
)
ml_gbm = register(
    WalkForwardSignal(
        "ml_gbm",
        (
            ParamSpec("max_iter", int, 100, minimum=1, maximum=2000, doc="boosting iterations"),
            ParamSpec("learning_rate", float, 0.1, minimum=1e-4, maximum=1.0, doc="shrinkage"),
            ParamSpec("max_leaf_nodes", int, 15, minimum=2, maximum=256, doc="leaves per tree"),
            ParamSpec("min_samples_leaf", int, 50, minimum=1, doc="training bins per leaf"),
            ParamSpec("l2_regularization", float, 0.0, minimum=0.0, doc="leaf L2 penalty"),
        ),
        _gbm_model,
    )
)
