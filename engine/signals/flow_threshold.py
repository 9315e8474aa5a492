"""``flow_threshold``: the gold flow score below spot against the flow score above it.

Per bin t (sides, distance ranks and weights as in :mod:`engine.signals.spot_sides`)::

    F_side(t) = sum_{d<k} w(d) * f[t, tick at rank d] / sum_{d<k} w(d)   (over finite cells only)
    score(t)  = clip((F_below(t) - F_above(t)) / 2, -1, 1)

Positive means more pressure-side flow under spot than over it, i.e. "price likely up". A flow
score in [-1, 1] keeps the half difference in [-1, 1]; the clip holds that range for a gold spec
whose flow score is unbounded. Evaluation fires when the score crosses its
threshold; the threshold is an evaluation parameter, not this signal's. NaN where the bin has no
spot or a side has no finite cell.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from engine.signals.registry import ParamValue, SignalInputs, register, validate_params
from engine.signals.spot_sides import side_params, spot_sides


class FlowThresholdSignal:
    """Half the difference of the weighted mean flow score below and above spot."""

    name = "flow_threshold"
    params = side_params("flow_score", "per-tick flow score in [-1, 1]", 5, "uniform")

    def score(self, inputs: SignalInputs, params: Mapping[str, ParamValue]) -> np.ndarray:
        values = validate_params(self.name, params)
        below, above = spot_sides(inputs, self.name, values, as_mean=True)
        score: np.ndarray = np.clip((below - above) / 2.0, -1.0, 1.0)
        return score


register(FlowThresholdSignal())
