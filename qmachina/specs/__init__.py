"""Spec contracts: strict models loaded from YAML with file:line errors, hashed canonically."""

from qmachina.specs.errors import SpecError, SpecIssue
from qmachina.specs.identity import canonical_json, spec_hash
from qmachina.specs.instrument import (
    DBN_PRICE_SCALE,
    EngineOverrides,
    EngineSettings,
    InstrumentConfig,
    load_instrument_config,
)
from qmachina.specs.pipeline import (
    CaptureSpec,
    PipelineIdentity,
    PipelineSpec,
    ResolvedPipeline,
    ResolvedSession,
    SessionWindow,
    default_configs_root,
    default_data_root,
    load_pipeline_spec,
    resolve_pipeline,
)
from qmachina.specs.spec_model import SpecModel
from qmachina.specs.yaml_loader import YamlDocument, load_spec, load_yaml_document

__all__ = [
    "DBN_PRICE_SCALE",
    "CaptureSpec",
    "EngineOverrides",
    "EngineSettings",
    "InstrumentConfig",
    "PipelineIdentity",
    "PipelineSpec",
    "ResolvedPipeline",
    "ResolvedSession",
    "SessionWindow",
    "SpecError",
    "SpecIssue",
    "SpecModel",
    "YamlDocument",
    "canonical_json",
    "default_configs_root",
    "default_data_root",
    "load_instrument_config",
    "load_pipeline_spec",
    "load_spec",
    "load_yaml_document",
    "resolve_pipeline",
    "spec_hash",
]
