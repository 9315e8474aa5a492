"""Gold: features derived from silver only — the VP force block and graphs in the gold DSL.

A graph (built from a validated ``qmachina.specs.gold.GoldSpec``) compiles to flat tables that
one numba step evaluates bin by bin (``ops``); ``run_gold`` runs it over a silver frame and
``IncrementalGold`` one pushed bin at a time, with identical results.
"""

from engine.gold.compiler import GoldProgram, compile_graph
from engine.gold.graph import GoldGraph, GoldGraphError, GoldNode, Kind, check_graph
from engine.gold.preview import (
    OutputStats,
    SilverFileError,
    output_stats,
    preview_gold,
    read_silver_sample,
)
from engine.gold.runtime import (
    GoldBin,
    GoldFrame,
    IncrementalGold,
    SilverBin,
    run_gold,
    silver_bins,
)

__all__ = [
    "GoldBin",
    "GoldFrame",
    "GoldGraph",
    "GoldGraphError",
    "GoldNode",
    "GoldProgram",
    "IncrementalGold",
    "Kind",
    "OutputStats",
    "SilverBin",
    "SilverFileError",
    "check_graph",
    "compile_graph",
    "output_stats",
    "preview_gold",
    "read_silver_sample",
    "run_gold",
    "silver_bins",
]
