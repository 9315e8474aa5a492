"""Spec loading: file:line errors, canonical identity, instrument and pipeline resolution."""

from __future__ import annotations

import hashlib
import textwrap
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from qmachina.specs import (
    EngineOverrides,
    EngineSettings,
    InstrumentConfig,
    ResolvedPipeline,
    SpecError,
    canonical_json,
    default_configs_root,
    default_data_root,
    load_instrument_config,
    load_pipeline_spec,
    resolve_pipeline,
    spec_hash,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"

ES_INSTRUMENT = """\
symbol: ESH4
venue: XCME
timezone: America/Chicago
tick_size: "0.25"
contract_multiplier: 50
n_absolute_ticks: 1024
grid_radius_ticks: 40
"""

ES_PIPELINE = """\
name: es_test
instrument: instruments/es.yaml
capture:
  dataset_files:
    - day1.mbo.dbn.zst
  raw_symbol: ESH4
"""


class SpecTree:
    """A throwaway configs root and data root with spec files written from text."""

    def __init__(self, root: Path) -> None:
        self.configs = root / "configs"
        self.data = root / "data"
        self.data.mkdir(parents=True)
        for name in ("day1.mbo.dbn.zst", "day2.mbo.dbn.zst"):
            (self.data / name).write_bytes(b"")

    def write(self, relative: str, text: str) -> Path:
        path = self.configs / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    def pipeline(
        self, text: str = ES_PIPELINE, instrument: str | None = ES_INSTRUMENT
    ) -> ResolvedPipeline:
        if instrument is not None:
            self.write("instruments/es.yaml", instrument)
        return resolve_pipeline(self.write("pipelines/p.yaml", text), self.configs, self.data)

    def pipeline_error(self, text: str, instrument: str | None = ES_INSTRUMENT) -> str:
        with pytest.raises(SpecError) as caught:
            self.pipeline(text, instrument)
        return str(caught.value)

    def instrument_error(self, text: str) -> str:
        path = self.write("instruments/bad.yaml", text)
        with pytest.raises(SpecError) as caught:
            load_instrument_config(path)
        return str(caught.value)


@pytest.fixture
def tree(tmp_path: Path) -> SpecTree:
    return SpecTree(tmp_path)


# --- shipped configs -------------------------------------------------------------------------


def test_shipped_es_instrument_loads_with_derived_tick_values() -> None:
    es = load_instrument_config(CONFIGS / "instruments" / "es.yaml")
    assert es.symbol == "ESH4"
    assert es.zone.key == "America/Chicago"
    assert es.tick_size == Decimal("0.25")
    assert es.tick_size_raw == 250_000_000
    assert es.price_decimals == 2
    assert es.contract_multiplier == 50
    assert es.price_scale == 1_000_000_000
    assert (es.n_absolute_ticks, es.grid_radius_ticks) == (256, 40)
    assert (es.bin_width_ms, es.bin_clock, es.bin_width_ns) == (100, "ts_event", 100_000_000)


def test_shipped_es_default_pipeline_resolves_against_the_sample_data(sample_dir: Path) -> None:
    resolved = resolve_pipeline(CONFIGS / "pipelines" / "es_default.yaml", CONFIGS, sample_dir)
    assert resolved.spec.capture.raw_symbol == "ESH4"
    assert resolved.dataset_paths == (sample_dir / "esh4-glbx-mdp3-20231225.mbo.dbn.zst",)
    assert all(path.is_absolute() and path.is_file() for path in resolved.dataset_paths)
    assert resolved.session is None
    assert (
        resolved.engine == load_instrument_config(CONFIGS / "instruments/es.yaml").engine_settings()
    )
    assert resolved.pipeline_hash == spec_hash(resolved.identity)
    assert len(resolved.pipeline_hash) == 64


def test_default_roots_are_the_shipped_configs_and_the_shared_data() -> None:
    assert default_configs_root() == CONFIGS
    assert default_data_root() == REPO_ROOT.parent / "shared" / "data" / "databento"
    resolved = resolve_pipeline(CONFIGS / "pipelines" / "es_default.yaml", check_files=False)
    assert resolved.instrument_file == CONFIGS / "instruments" / "es.yaml"


@pytest.mark.parametrize("path", sorted((CONFIGS / "instruments").glob("*.yaml")), ids=str)
def test_every_shipped_instrument_config_validates(path: Path) -> None:
    load_instrument_config(path)


@pytest.mark.parametrize("path", sorted((CONFIGS / "pipelines").glob("*.yaml")), ids=str)
def test_every_shipped_pipeline_resolves(path: Path) -> None:
    resolve_pipeline(path, CONFIGS, check_files=False)


# --- canonical identity ----------------------------------------------------------------------


def test_canonical_json_sorts_keys_without_whitespace() -> None:
    settings = EngineSettings(n_absolute_ticks=1024, grid_radius_ticks=40, tau_jerk_s=3)
    expected = (
        '{"bin_clock":"ts_event","bin_width_ms":100,"grid_radius_ticks":40,'
        '"n_absolute_ticks":1024,"tau_acceleration_s":1.0,"tau_jerk_s":3.0,'
        '"tau_rest_decay_s":1.0,"tau_velocity_s":0.5}'
    )
    assert canonical_json(settings) == expected
    assert spec_hash(settings) == hashlib.sha256(expected.encode()).hexdigest()


def test_canonical_json_writes_decimals_as_plain_text() -> None:
    es = load_instrument_config(CONFIGS / "instruments" / "es.yaml")
    text = canonical_json(es)
    assert '"tick_size":"0.25"' in text
    assert '"contract_multiplier":"50"' in text


def test_hash_ignores_key_order_formatting_and_trailing_zeros(tree: SpecTree) -> None:
    first = tree.pipeline()
    reordered_instrument = """\
    # the same instrument, written differently
    {grid_radius_ticks: 40, n_absolute_ticks: 1024, contract_multiplier: "50.0",
     tick_size: '0.250', timezone: "America/Chicago", venue: XCME, symbol: "ESH4",
     bin_width_ms: 100, tau_jerk_s: 2}
    """
    reordered_pipeline = """\
    capture: {raw_symbol: ESH4, dataset_files: [./day1.mbo.dbn.zst]}
    instrument: "instruments/es.yaml"
    name: es_test
    engine: {}
    """
    second = tree.pipeline(reordered_pipeline, reordered_instrument)
    assert second.identity == first.identity
    assert second.pipeline_hash == first.pipeline_hash


def test_hash_changes_when_a_value_changes(tree: SpecTree) -> None:
    base = tree.pipeline().pipeline_hash
    changed_instrument = ES_INSTRUMENT.replace('tick_size: "0.25"', 'tick_size: "0.5"')
    assert tree.pipeline(ES_PIPELINE, changed_instrument).pipeline_hash != base
    overridden = ES_PIPELINE + "engine:\n  tau_velocity_s: 0.25\n"
    assert tree.pipeline(overridden).pipeline_hash != base
    other_day = ES_PIPELINE.replace("day1", "day2")
    assert tree.pipeline(other_day).pipeline_hash != base
    assert tree.pipeline().pipeline_hash == base


def test_hash_names_content_not_labels_or_machine_paths(tree: SpecTree, tmp_path: Path) -> None:
    base = tree.pipeline()
    renamed = tree.pipeline(ES_PIPELINE.replace("name: es_test", "name: renamed"))
    assert renamed.pipeline_hash == base.pipeline_hash

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "day1.mbo.dbn.zst").write_bytes(b"")
    moved = resolve_pipeline(tree.configs / "pipelines/p.yaml", tree.configs, elsewhere)
    assert moved.dataset_paths == (elsewhere / "day1.mbo.dbn.zst",)
    assert moved.pipeline_hash == base.pipeline_hash

    absolute = ES_PIPELINE.replace("day1.mbo.dbn.zst", str(elsewhere / "day1.mbo.dbn.zst"))
    assert tree.pipeline(absolute).pipeline_hash == base.pipeline_hash


def test_override_equal_to_the_instrument_value_keeps_the_hash(tree: SpecTree) -> None:
    base = tree.pipeline().pipeline_hash
    assert tree.pipeline(ES_PIPELINE + "engine:\n  bin_width_ms: 100\n").pipeline_hash == base


# --- error locations -------------------------------------------------------------------------


def test_unknown_field_is_named_with_its_line(tree: SpecTree) -> None:
    text = ES_PIPELINE + "engine:\n  bin_widht_ms: 250\n"
    message = tree.pipeline_error(text)
    assert message == (
        f"{tree.configs / 'pipelines/p.yaml'}:8: engine.bin_widht_ms: "
        "unknown field 'bin_widht_ms'; did you mean 'bin_width_ms'?"
    )


def test_unknown_top_level_field_lists_the_known_ones(tree: SpecTree) -> None:
    message = tree.instrument_error(ES_INSTRUMENT + "colour: blue\n")
    assert message.startswith(f"{tree.configs / 'instruments/bad.yaml'}:8: colour: unknown field")
    assert "expected one of: symbol, instrument_id, venue" in message


def test_wrong_type_names_line_and_field_path(tree: SpecTree) -> None:
    text = ES_PIPELINE + "engine:\n  tau_jerk_s: 1.5\n  bin_width_ms: fast\n"
    message = tree.pipeline_error(text)
    assert message == (
        f"{tree.configs / 'pipelines/p.yaml'}:9: engine.bin_width_ms: "
        "Input should be a valid integer (got 'fast')"
    )


def test_yaml_scalars_are_not_coerced_into_numbers(tree: SpecTree) -> None:
    message = tree.instrument_error(ES_INSTRUMENT + 'bin_width_ms: "100"\ntau_jerk_s: true\n')
    assert ":8: bin_width_ms: Input should be a valid integer (got '100')" in message
    assert ":9: tau_jerk_s: Input should be a valid number (got True)" in message


def test_every_error_is_listed_in_line_order(tree: SpecTree) -> None:
    text = ES_PIPELINE + "engine:\n  grid_radius_ticks: -1\n  bin_width_ms: 0\n"
    file = tree.configs / "pipelines/p.yaml"
    assert tree.pipeline_error(text).splitlines() == [
        f"{file}:8: engine.grid_radius_ticks: Input should be greater than 0",
        f"{file}:9: engine.bin_width_ms: Input should be greater than 0",
    ]


def test_sequence_items_are_located(tree: SpecTree) -> None:
    text = ES_PIPELINE.replace("    - day1.mbo.dbn.zst\n", "    - day1.mbo.dbn.zst\n    - 17\n")
    message = tree.pipeline_error(text)
    assert message == (
        f"{tree.configs / 'pipelines/p.yaml'}:6: capture.dataset_files[1]: "
        "Input should be a valid string (got 17)"
    )


def test_missing_field_is_reported_at_its_mapping(tree: SpecTree) -> None:
    message = tree.instrument_error(ES_INSTRUMENT.replace("venue: XCME\n", ""))
    assert message == f"{tree.configs / 'instruments/bad.yaml'}:1: venue: Field required"


def test_yaml_syntax_error_has_file_and_line(tree: SpecTree) -> None:
    text = ES_PIPELINE.replace("  raw_symbol: ESH4", "  raw_symbol: [ESH4")
    message = tree.pipeline_error(text)
    assert message.startswith(f"{tree.configs / 'pipelines/p.yaml'}:7: invalid YAML: ")


def test_duplicate_keys_are_errors(tree: SpecTree) -> None:
    message = tree.instrument_error(ES_INSTRUMENT + "tick_size: '0.5'\n")
    assert message == (
        f"{tree.configs / 'instruments/bad.yaml'}:8: tick_size: "
        "duplicate key (first given at line 4)"
    )


def test_only_safe_yaml_tags_are_constructed(tree: SpecTree) -> None:
    message = tree.instrument_error("symbol: !!python/object/apply:os.getcwd []\n")
    assert ":1: invalid YAML: could not determine a constructor" in message


def test_empty_and_non_mapping_documents_are_errors(tree: SpecTree) -> None:
    assert tree.instrument_error("# nothing here\n").endswith(
        ":1: file is empty; expected a mapping of fields"
    )
    assert tree.instrument_error("- ESH4\n").endswith(":1: expected a mapping of fields, got list")


def test_missing_spec_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match=r"nope\.yaml: file not found"):
        load_pipeline_spec(missing)


def test_spec_error_is_a_value_error_with_structured_issues(tree: SpecTree) -> None:
    with pytest.raises(ValueError, match="bin_width_ms") as caught:
        tree.pipeline(ES_PIPELINE + "engine:\n  bin_width_ms: 0\n")
    assert isinstance(caught.value, SpecError)
    (issue,) = caught.value.issues
    assert (issue.line, issue.field) == (8, "engine.bin_width_ms")


# --- instrument rules ------------------------------------------------------------------------


def test_bad_timezone(tree: SpecTree) -> None:
    message = tree.instrument_error(ES_INSTRUMENT.replace("America/Chicago", "America/Springfield"))
    assert message == (
        f"{tree.configs / 'instruments/bad.yaml'}:3: timezone: unknown timezone "
        "'America/Springfield'; use an IANA name such as 'America/Chicago'"
    )


def test_tick_size_must_be_representable_in_price_scale(tree: SpecTree) -> None:
    message = tree.instrument_error(ES_INSTRUMENT.replace('"0.25"', '"0.0000000005"'))
    assert ":4: tick_size: tick size 0.0000000005 is not a whole number of price units" in message
    scaled = ES_INSTRUMENT.replace('"0.25"', '"0.25"\nprice_scale: 10')
    assert ":4: tick_size: tick size 0.25 is not a whole number" in tree.instrument_error(scaled)


def test_tick_size_must_be_exact_text_and_positive(tree: SpecTree) -> None:
    as_float = tree.instrument_error(ES_INSTRUMENT.replace('"0.25"', "0.25"))
    assert ":4: tick_size: write 0.25 as a quoted decimal string" in as_float
    assert ":4: tick_size: Input should be greater than 0" in tree.instrument_error(
        ES_INSTRUMENT.replace('"0.25"', '"0"')
    )
    assert ":4: tick_size: expected a decimal number" in tree.instrument_error(
        ES_INSTRUMENT.replace('"0.25"', '"1e-2"')
    )


def test_grid_radius_must_leave_room_to_reanchor(tree: SpecTree) -> None:
    message = tree.instrument_error(
        ES_INSTRUMENT.replace("grid_radius_ticks: 40", "grid_radius_ticks: 512")
    )
    assert message == (
        f"{tree.configs / 'instruments/bad.yaml'}:7: grid_radius_ticks: grid_radius_ticks (512) "
        "needs n_absolute_ticks >= 4 * radius + 2 (2050), got 1024: the grid around spot must "
        "stay a radius inside the absolute tick window, with room to re-anchor"
    )
    widest = ES_INSTRUMENT.replace("grid_radius_ticks: 40", "grid_radius_ticks: 255")
    path = tree.write("instruments/widest.yaml", widest)
    assert load_instrument_config(path).grid_radius_ticks == 255


def test_instrument_round_trips_through_json() -> None:
    es = load_instrument_config(CONFIGS / "instruments" / "es.yaml")
    assert InstrumentConfig.model_validate(es.model_dump(mode="json")) == es
    assert InstrumentConfig.model_validate_json(es.model_dump_json()) == es


# --- pipelines -------------------------------------------------------------------------------


def test_missing_referenced_instrument_is_named(tree: SpecTree) -> None:
    text = ES_PIPELINE.replace("instruments/es.yaml", "instruments/nq.yaml")
    message = tree.pipeline_error(text)
    assert message == (
        f"{tree.configs / 'pipelines/p.yaml'}:2: instrument: instrument config "
        f"{tree.configs / 'instruments/nq.yaml'} not found"
    )


def test_errors_in_the_referenced_instrument_name_both_files(tree: SpecTree) -> None:
    broken = ES_INSTRUMENT.replace("America/Chicago", "Chicago")
    lines = tree.pipeline_error(ES_PIPELINE, broken).splitlines()
    assert lines[0].startswith(f"{tree.configs / 'instruments/es.yaml'}:3: timezone: unknown")
    assert lines[1] == (
        f"{tree.configs / 'pipelines/p.yaml'}:2: instrument: instrument config "
        f"{tree.configs / 'instruments/es.yaml'} is invalid (see above)"
    )


def test_instrument_reference_must_be_relative(tree: SpecTree) -> None:
    text = ES_PIPELINE.replace("instruments/es.yaml", "/etc/es.yaml")
    assert ":2: instrument: '/etc/es.yaml' must be relative to the configs root" in (
        tree.pipeline_error(text)
    )


def test_engine_overrides_are_applied(tree: SpecTree) -> None:
    text = ES_PIPELINE + "engine:\n  bin_width_ms: 250\n  bin_clock: ts_recv\n  tau_jerk_s: 4\n"
    resolved = tree.pipeline(text)
    assert resolved.engine.bin_width_ms == 250
    assert resolved.engine.bin_clock == "ts_recv"
    assert resolved.engine.tau_jerk_s == 4.0
    assert resolved.engine.n_absolute_ticks == 1024  # from the instrument
    assert resolved.instrument.bin_width_ms == 250  # the instrument carries effective values
    assert resolved.instrument.engine_settings() == resolved.engine
    assert resolved.spec.engine == EngineOverrides(
        bin_width_ms=250, bin_clock="ts_recv", tau_jerk_s=4
    )


def test_engine_overrides_are_validated_field_by_field(tree: SpecTree) -> None:
    text = ES_PIPELINE + "engine:\n  tau_velocity_s: -0.5\n  bin_clock: wallclock\n"
    message = tree.pipeline_error(text)
    assert ":8: engine.tau_velocity_s: Input should be greater than 0" in message
    assert ":9: engine.bin_clock: Input should be 'ts_event' or 'ts_recv'" in message


def test_engine_overrides_are_validated_against_the_instrument(tree: SpecTree) -> None:
    # The instrument's radius 40 no longer fits once the window shrinks to 64 ticks.
    message = tree.pipeline_error(ES_PIPELINE + "engine:\n  n_absolute_ticks: 64\n")
    assert message.startswith(
        f"{tree.configs / 'pipelines/p.yaml'}:7: engine.grid_radius_ticks: "
        "grid_radius_ticks (40) needs n_absolute_ticks >= 4 * radius + 2 (162), got 64"
    )


def test_engine_override_fields_match_engine_settings() -> None:
    assert list(EngineOverrides.model_fields) == list(EngineSettings.model_fields)
    instrument_fields = set(InstrumentConfig.model_fields)
    assert set(EngineSettings.model_fields) <= instrument_fields


def test_instrument_id_and_raw_symbol_are_exclusive(tree: SpecTree) -> None:
    both = ES_PIPELINE + "  instrument_id: 5602\n"
    expected = (
        f"{tree.configs / 'pipelines/p.yaml'}:3: capture: "
        "give exactly one of instrument_id or raw_symbol"
    )
    assert tree.pipeline_error(both) == expected
    neither = ES_PIPELINE.replace("  raw_symbol: ESH4\n", "")
    assert tree.pipeline_error(neither) == expected
    by_id = tree.pipeline(ES_PIPELINE.replace("raw_symbol: ESH4", "instrument_id: 5602"))
    assert by_id.spec.capture.instrument_id == 5602


def test_capture_instrument_id_must_match_the_instrument(tree: SpecTree) -> None:
    instrument = ES_INSTRUMENT + "instrument_id: 1\n"
    text = ES_PIPELINE.replace("raw_symbol: ESH4", "instrument_id: 2")
    assert ":6: capture.instrument_id: 2 differs from instrument_id 1" in tree.pipeline_error(
        text, instrument
    )


def test_missing_dataset_file_is_located(tree: SpecTree) -> None:
    text = ES_PIPELINE.replace("day1.mbo.dbn.zst", "day9.mbo.dbn.zst")
    assert tree.pipeline_error(text) == (
        f"{tree.configs / 'pipelines/p.yaml'}:5: capture.dataset_files[0]: "
        f"dataset file {tree.data / 'day9.mbo.dbn.zst'} not found"
    )
    unchecked = resolve_pipeline(
        tree.configs / "pipelines/p.yaml", tree.configs, tree.data, check_files=False
    )
    assert unchecked.dataset_paths == (tree.data / "day9.mbo.dbn.zst",)


def test_dataset_files_listed_once_and_not_empty(tree: SpecTree) -> None:
    twice = ES_PIPELINE.replace("    - day1.mbo.dbn.zst\n", "    - day1.mbo.dbn.zst\n" * 2)
    assert ":4: capture.dataset_files: listed more than once: day1" in tree.pipeline_error(twice)
    empty = ES_PIPELINE.replace("\n    - day1.mbo.dbn.zst", " []")
    assert ":4: capture.dataset_files: Tuple should have at least 1 item" in tree.pipeline_error(
        empty
    )


def test_session_window_is_read_in_the_instrument_timezone(tree: SpecTree) -> None:
    text = ES_PIPELINE + '  session: {start: "2023-12-25T17:00", end: 2023-12-25 19:30:00}\n'
    session = tree.pipeline(text).session
    assert session is not None
    assert session.start.astimezone(UTC) == datetime(2023, 12, 25, 23, 0, tzinfo=UTC)
    assert session.end.astimezone(UTC) == datetime(2023, 12, 26, 1, 30, tzinfo=UTC)
    assert session.start_ns == 1_703_545_200_000_000_000
    assert session.end_ns - session.start_ns == 9_000 * 10**9


def test_session_window_rules(tree: SpecTree) -> None:
    aware = ES_PIPELINE + '  session: {start: "2023-12-25T17:00-06:00", end: "2023-12-25T18:00"}\n'
    assert ":7: capture.session.start: give a local time without offset" in tree.pipeline_error(
        aware
    )
    backwards = ES_PIPELINE + '  session: {start: "2023-12-25T18:00", end: "2023-12-25T17:00"}\n'
    assert ":7: capture.session: session end 2023-12-25 17:00:00 must be after start" in (
        tree.pipeline_error(backwards)
    )
    skipped = (
        ES_PIPELINE + '  session:\n    start: "2024-03-10T02:30"\n    end: "2024-03-10T05:00"\n'
    )
    assert ":8: capture.session.start: 2024-03-10T02:30:00 does not exist in America/Chicago" in (
        tree.pipeline_error(skipped)
    )
    repeated = (
        ES_PIPELINE + '  session:\n    start: "2024-11-03T00:00"\n    end: "2024-11-03T01:30"\n'
    )
    assert ":9: capture.session.end: 2024-11-03T01:30:00 is ambiguous in America/Chicago" in (
        tree.pipeline_error(repeated)
    )


def test_resolved_pipeline_round_trips_through_json(tree: SpecTree) -> None:
    text = ES_PIPELINE + '  session: {start: "2023-12-25T17:00", end: "2023-12-25T18:00"}\n'
    resolved = tree.pipeline(text)
    assert ResolvedPipeline.model_validate_json(resolved.model_dump_json()) == resolved
