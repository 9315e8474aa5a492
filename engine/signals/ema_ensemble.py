"""``ema_ensemble``: an ensemble of EMA crossovers of spot, tanh-squashed into (-1, 1).

Per bin t, with ``P(t) = spot_x2 / 2`` the spot in ticks (silver carries the last valid spot over
bins whose book is invalid) and ``EMA_n`` the bias-corrected EMA of span n bins
(:func:`engine.signals.causal.ema`)::

    C(t)     = sum_{i=1..3} (EMA_fast_i(P)(t) - EMA_slow_i(P)(t)) / 3      (ticks)
    scale(t) = max(EMA_scale_span(|P(t) - P(t-1)|)(t), min_scale_ticks)  (ticks per bin)
    score(t) = tanh(gain * C(t) / scale(t))

Dividing by the typical spot move per bin makes the crossover read the same in quiet and busy
markets; at the first spot, which has no move yet, the scale is the floor. Fewer pairs: repeat a
pair (the mean of equal pairs is that pair). NaN before the first spot.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from engine.signals.causal import backward_difference, ema
from engine.signals.registry import (
    ParamSpec,
    ParamValue,
    SignalError,
    SignalInputs,
    register,
    validate_params,
)

PAIRS = (
    ("fast_span_1", "slow_span_1"),
    ("fast_span_2", "slow_span_2"),
    ("fast_span_3", "slow_span_3"),
)
DEFAULT_SPANS = ((4, 16), (16, 64), (64, 256))
MAX_SPAN = 1_000_000


def _span_params() -> tuple[ParamSpec, ...]:
    specs: list[ParamSpec] = []
    for (fast, slow), (fast_span, slow_span) in zip(PAIRS, DEFAULT_SPANS, strict=True):
        specs.append(
            ParamSpec(fast, int, fast_span, minimum=1, maximum=MAX_SPAN, doc="fast EMA span, bins")
        )
        specs.append(
            ParamSpec(
                slow,
                int,
                slow_span,
                minimum=2,
                maximum=MAX_SPAN,
                doc=f"slow EMA span, bins (> {fast})",
            )
        )
    return tuple(specs)


class EmaEnsembleSignal:
    """Mean of three normalised EMA crossovers of spot, squashed with tanh."""

    name = "ema_ensemble"
    params = (
        *_span_params(),
        ParamSpec(
            "scale_span",
            int,
            600,
            minimum=1,
            maximum=MAX_SPAN,
            doc="EMA span of the absolute spot move per bin that scales the crossover, bins",
        ),
        ParamSpec(
            "min_scale_ticks",
            float,
            0.01,
            minimum=1e-6,
            maximum=100.0,
            doc="floor of the scale, ticks per bin (a spot that has not moved yet)",
        ),
        ParamSpec("gain", float, 1.0, minimum=0.0, maximum=100.0, doc="gain before the tanh"),
    )

    def score(self, inputs: SignalInputs, params: Mapping[str, ParamValue]) -> np.ndarray:
        values = validate_params(self.name, params)
        for fast, slow in PAIRS:
            if int(values[fast]) >= int(values[slow]):
                raise SignalError(
                    f"signal {self.name!r} parameters {fast!r}, {slow!r}: the fast span "
                    f"{values[fast]} must be shorter than the slow span {values[slow]}"
                )
        spot_x2 = inputs.frame.spot_x2
        spot = np.where(spot_x2 >= 0, spot_x2 / 2.0, np.nan)
        spans = {int(values[name]) for pair in PAIRS for name in pair}
        averages = {span: ema(spot, span) for span in sorted(spans)}
        crossover = np.zeros(len(spot))
        for fast, slow in PAIRS:
            crossover += averages[int(values[fast])] - averages[int(values[slow])]
        crossover /= len(PAIRS)
        move = np.abs(backward_difference(spot))
        scale = np.fmax(ema(move, int(values["scale_span"])), float(values["min_scale_ticks"]))
        score: np.ndarray = np.tanh(float(values["gain"]) * crossover / scale)
        return score


register(EmaEnsembleSignal())
