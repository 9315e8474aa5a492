"""The ES grid config the tests use: the one the shipped ES pipeline resolves to."""

from __future__ import annotations

from engine.silver import GridConfig
from qmachina.silver_build import grid_config_of
from qmachina.specs.pipeline import default_configs_root, resolve_pipeline

ES_PIPELINE = default_configs_root() / "pipelines" / "es_default.yaml"
ES_GRID: GridConfig = grid_config_of(resolve_pipeline(ES_PIPELINE, check_files=False))
