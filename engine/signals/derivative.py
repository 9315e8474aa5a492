"""``derivative``: how fast the gold state tilts toward one side of spot, as a score in (-1, 1).

Per bin t (sides, distance ranks and weights as in :mod:`engine.signals.spot_sides`)::

    I_below(t) = sum_{d<k} w(d) * g[t, tick below spot at rank d]     (NaN cells skipped)
    I_above(t) = sum_{d<k} w(d) * g[t, tick above spot at rank d]
    net(t)     = I_below(t) - I_above(t)
    D1 = net(t) - net(t-1),  D2 = D1(t) - D1(t-1),  D3 = D2(t) - D2(t-1)
    Zn = robust_z(Dn, z_window, z_min_periods)                        (trailing, bins <= t)
    score(t) = tanh(sum_n v_n * Zn(t)),   v_n = w_dn / (w_d1 + w_d2 + w_d3)

Terms with ``v_n = 0`` are left out, so a zero weight also drops its difference's warm-up.

With the default grid ``state`` (+1 pressure, -1 vacuum), pressure building below spot and vacuum
opening above both raise ``net``: price is pushed up from below and drawn into the empty asks, so
a positive score means "price likely up". NaN where the bin has no spot, where a side has no
finite cell, while a used difference reaches back past bin 0 or a NaN net, and while its robust z
has fewer than ``z_min_periods`` finite values (see :func:`engine.signals.causal.robust_z`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from engine.signals.causal import backward_difference, robust_z
from engine.signals.registry import (
    ParamSpec,
    ParamValue,
    SignalError,
    SignalInputs,
    register,
    validate_params,
)
from engine.signals.spot_sides import side_params, spot_sides

ORDER_WEIGHTS = ("w_d1", "w_d2", "w_d3")


class DerivativeSignal:
    """Robust-z blend of the first three time differences of the below-minus-above intensity."""

    name = "derivative"
    params = (
        *side_params("state", "per-tick state, +1 pressure / 0 neutral / -1 vacuum", 10, "inverse"),
        ParamSpec("z_window", int, 600, minimum=2, maximum=1_000_000, doc="robust z window, bins"),
        ParamSpec(
            "z_min_periods",
            int,
            60,
            minimum=1,
            maximum=1_000_000,
            doc="finite values the robust z window needs before it scores (<= z_window)",
        ),
        ParamSpec("w_d1", float, 0.5, minimum=0.0, maximum=1.0, doc="blend weight of the 1st diff"),
        ParamSpec("w_d2", float, 0.3, minimum=0.0, maximum=1.0, doc="blend weight of the 2nd diff"),
        ParamSpec("w_d3", float, 0.2, minimum=0.0, maximum=1.0, doc="blend weight of the 3rd diff"),
    )

    def score(self, inputs: SignalInputs, params: Mapping[str, ParamValue]) -> np.ndarray:
        values = validate_params(self.name, params)
        window = int(values["z_window"])
        min_periods = int(values["z_min_periods"])
        if min_periods > window:
            raise SignalError(
                f"signal {self.name!r} parameter 'z_min_periods': {min_periods} exceeds "
                f"z_window {window}"
            )
        weights = np.array([float(values[name]) for name in ORDER_WEIGHTS])
        if weights.sum() <= 0.0:
            raise SignalError(
                f"signal {self.name!r} parameters {', '.join(ORDER_WEIGHTS)}: all are zero"
            )
        below, above = spot_sides(inputs, self.name, values, as_mean=False)
        difference = below - above
        blend = np.zeros(inputs.frame.n_bins)
        for weight in weights / weights.sum():
            difference = backward_difference(difference)
            if weight > 0.0:
                blend += weight * robust_z(difference, window, min_periods)
        return np.tanh(blend)


register(DerivativeSignal())
