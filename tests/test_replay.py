"""Tests for engine.replay against the real Databento sample files and damaged copies of them."""

from __future__ import annotations

import math
import pickle
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import databento
import databento_dbn
import numpy as np
import numpy.typing as npt
import pytest
import zstandard
from databento_dbn.metadata import MappingInterval

from engine.events import EVENT_DTYPE, F_LAST, F_SNAPSHOT
from engine.replay import (
    CorruptFileError,
    EventArray,
    MissingFileError,
    NotMboError,
    OverlappingFilesError,
    ReplayError,
    TruncatedFileError,
    UnknownInstrumentError,
    UnsortedFileError,
    UnsupportedFileError,
    file_summary,
    mbo_to_events,
    paced,
    replay_files,
    session_window_ns,
)

MBO_FILES = [
    "dbn_test_data.mbo.v1.dbn.zst",
    "dbn_test_data.mbo.v2.dbn",
    "dbn_test_data.mbo.v3.dbn",
    "esh4-glbx-mdp3-20231224.mbo.dbn.zst",
    "esh4-glbx-mdp3-20231225.mbo.dbn.zst",
    "esm4-glbx-mdp3-20240508-0000-0002.mbo.dbn.zst",
    "glbx.mdp3_test_data.mbo.dbn.zst",
    "ifeu.impact_test_data.mbo.dbn.zst",
    "xnas.itch_test_data.mbo.dbn.zst",
]
ES_DEC24 = "esh4-glbx-mdp3-20231224.mbo.dbn.zst"
ES_DEC25 = "esh4-glbx-mdp3-20231225.mbo.dbn.zst"
ESH4_ID = 17077
NS = 1_000_000_000
# The databento_dbn stub types enum members as str; they are enum values at runtime.
RAW_SYMBOL = cast("databento_dbn.SType", databento_dbn.SType.RAW_SYMBOL)
INSTRUMENT_ID = cast("databento_dbn.SType", databento_dbn.SType.INSTRUMENT_ID)
MBO = cast("databento_dbn.Schema", databento_dbn.Schema.MBO)


# ------------------------------------------------------------------------------------ helpers


def databento_records(path: Path) -> npt.NDArray[np.void]:
    """The reference decoding: ``DBNStore.to_ndarray()`` (from bytes, so no file handle leaks)."""
    arr: npt.NDArray[np.void] = databento.DBNStore.from_bytes(path.read_bytes()).to_ndarray()
    return arr


def read_all(*paths: Path, **kwargs: Any) -> EventArray:
    """Every event ``replay_files`` yields, in one array."""
    batches = list(replay_files(list(paths), **kwargs))
    return np.concatenate(batches) if batches else np.empty(0, dtype=EVENT_DTYPE)


def as_ascii(field: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """An ``S1`` column from databento as ASCII codes, like the event envelope stores it."""
    return np.frombuffer(np.ascontiguousarray(field).tobytes(), dtype=np.uint8)


@dataclass
class _Interval:
    start_date: date
    end_date: date
    symbol: str


@dataclass
class _Mapping:
    raw_symbol: str
    intervals: Sequence[MappingInterval]


def write_mbo(
    path: Path,
    events: EventArray,
    *,
    start: int,
    end: int | None,
    symbols: dict[str, int],
    zstd: bool = False,
    ts_out: bool = False,
) -> Path:
    """Write real DBN v3 MBO (databento_dbn metadata + records in databento's own layout)."""
    day0 = datetime.fromtimestamp(start // NS, UTC).date()
    mappings = [
        _Mapping(s, [_Interval(day0, day0 + timedelta(days=2), str(i))]) for s, i in symbols.items()
    ]
    metadata = databento_dbn.Metadata(
        dataset="GLBX.MDP3",
        start=start,
        end=end,
        stype_in=RAW_SYMBOL,
        stype_out=INSTRUMENT_ID,
        schema=MBO,
        symbols=list(symbols),
        mappings=mappings,
        ts_out=ts_out,
        version=3,
    )
    fields = [
        ("length", "u1"),
        ("rtype", "u1"),
        ("publisher_id", "<u2"),
        ("instrument_id", "<u4"),
        ("ts_event", "<u8"),
        ("order_id", "<u8"),
        ("price", "<i8"),
        ("size", "<u4"),
        ("flags", "u1"),
        ("channel_id", "u1"),
        ("action", "u1"),
        ("side", "u1"),
        ("ts_recv", "<u8"),
        ("ts_in_delta", "<i4"),
        ("sequence", "<u4"),
    ]
    if ts_out:
        fields.append(("ts_out", "<u8"))
    raw = np.zeros(len(events), dtype=np.dtype(fields))
    raw["length"] = raw.dtype.itemsize // 4
    raw["rtype"] = 0xA0
    raw["publisher_id"] = 1
    for name in EVENT_DTYPE.names or ():
        raw[name] = events[name]
    if ts_out:
        raw["ts_out"] = events["ts_recv"] + 1_000
    data = metadata.encode() + raw.tobytes()
    if zstd:
        data = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    path.write_bytes(data)
    return path


def make_events(ts_recv: list[int], instrument_ids: list[int] | None = None) -> EventArray:
    """Plain Add events at the given receive times."""
    ev = np.zeros(len(ts_recv), dtype=EVENT_DTYPE)
    ev["ts_recv"] = ts_recv
    ev["ts_event"] = ts_recv
    ev["order_id"] = np.arange(1, len(ts_recv) + 1)
    ev["price"] = 4_800 * NS
    ev["size"] = 1
    ev["instrument_id"] = instrument_ids if instrument_ids is not None else 1
    ev["action"] = ord("A")
    ev["side"] = ord("B")
    ev["flags"] = F_LAST
    ev["channel_id"] = 3  # the samples all have channel 0; make a dropped field visible
    ev["sequence"] = np.arange(100, 100 + len(ts_recv))
    return ev


# ------------------------------------------------------------------------------- reading files


def test_sample_dir_holds_the_expected_mbo_files(sample_dir: Path) -> None:
    assert sorted(p.name for p in sample_dir.glob("*.mbo*")) == sorted(MBO_FILES)


@pytest.mark.parametrize("name", MBO_FILES)
def test_every_mbo_sample_matches_databento(sample_dir: Path, name: str) -> None:
    path = sample_dir / name
    ref = databento_records(path)
    events = read_all(path)
    assert events.dtype == EVENT_DTYPE
    assert len(events) == len(ref) > 0
    for field in EVENT_DTYPE.names or ():
        expected = as_ascii(ref[field]) if field in ("action", "side") else ref[field]
        np.testing.assert_array_equal(events[field], expected, err_msg=field)


def test_dbn_versions_1_2_3_hold_the_same_records(sample_dir: Path) -> None:
    names = ["dbn_test_data.mbo.v1.dbn.zst", "dbn_test_data.mbo.v2.dbn", "dbn_test_data.mbo.v3.dbn"]
    versions = [file_summary(sample_dir / n).dbn_version for n in names]
    assert versions == [1, 2, 3]
    v1, v2, v3 = (read_all(sample_dir / n) for n in names)
    assert len(v1) == 2
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(v1, v3)


def test_esh4_christmas_file_has_its_known_contents(sample_dir: Path) -> None:
    events = read_all(sample_dir / ES_DEC25)
    assert len(events) == 68_792
    snapshot = (events["flags"] & F_SNAPSHOT) != 0
    assert int(snapshot.sum()) == 8_725
    assert snapshot[:8_725].all()  # the snapshot comes first, then live flow
    assert set(np.unique(events["instrument_id"]).tolist()) == {ESH4_ID}
    assert set(np.unique(events["action"]).tolist()) == {ord(c) for c in "ACMFT"}


def test_batches_are_full_except_the_last(sample_dir: Path) -> None:
    batches = list(replay_files([sample_dir / ES_DEC25], batch_size=10_000))
    assert [len(b) for b in batches] == [10_000] * 6 + [8_792]
    np.testing.assert_array_equal(np.concatenate(batches), read_all(sample_dir / ES_DEC25))


@pytest.mark.parametrize("read_bytes", [1, 55, 56, 57, 1_000, 1 << 22])
def test_records_split_across_reads_are_whole(
    sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_bytes: int
) -> None:
    # A plain copy of the ES file read in steps that cut records anywhere (or never).
    plain = tmp_path / "es.dbn"
    with zstandard.ZstdDecompressor().stream_reader(
        _es_zst(sample_dir), read_across_frames=True
    ) as reader:
        plain.write_bytes(reader.read())
    monkeypatch.setattr("engine.replay._PLAIN_READ", read_bytes)
    events = read_all(plain) if read_bytes > 1 else read_all(plain, end_ns=1_703_545_200 * NS)
    expected = read_all(sample_dir / ES_DEC25)
    np.testing.assert_array_equal(events, expected[: len(events)])
    assert len(events) == (len(expected) if read_bytes > 1 else 8_725 + 924)


def test_mbo_to_events_copies_raw_records_as_replay_does_and_names_a_bad_one(
    sample_dir: Path,
) -> None:
    data = _plain(sample_dir)
    dtype = np.dtype([(n, "u1" if c == "S1" else c) for n, c in databento_dbn.MBOMsg._dtypes])
    raw = np.frombuffer(data[len(data) - 2 * dtype.itemsize :], dtype=dtype)
    np.testing.assert_array_equal(
        mbo_to_events(raw), read_all(sample_dir / "dbn_test_data.mbo.v3.dbn")
    )
    bad = raw.copy()
    bad["side"][1] = ord("Q")
    with pytest.raises(ValueError, match=r"record 1 is not an MBO record .* side 0x51"):
        mbo_to_events(bad)


def test_ts_out_records_are_read_with_their_longer_layout(tmp_path: Path) -> None:
    events = make_events([10 * NS, 11 * NS, 12 * NS])
    path = write_mbo(
        tmp_path / "live.dbn", events, start=10 * NS, end=13 * NS, symbols={"X": 1}, ts_out=True
    )
    np.testing.assert_array_equal(read_all(path), events)


def test_file_summary_describes_the_file(sample_dir: Path) -> None:
    summary = file_summary(sample_dir / ES_DEC25)
    ref = databento_records(sample_dir / ES_DEC25)
    assert summary.path == sample_dir / ES_DEC25
    assert (summary.dbn_version, summary.schema, summary.dataset) == (1, "mbo", "GLBX.MDP3")
    assert summary.compressed
    assert summary.record_count == 68_792
    assert summary.instrument_ids == (ESH4_ID,)
    assert summary.symbols == {"ESH4": (ESH4_ID,)}
    assert summary.first_ts_recv == int(ref["ts_recv"][0])
    assert summary.last_ts_recv == int(ref["ts_recv"][-1])
    assert summary.start_ns == 1_703_462_400 * NS
    assert summary.end_ns == summary.start_ns + 86_400 * NS


def test_file_summary_also_reads_other_schemas(sample_dir: Path) -> None:
    path = sample_dir / "glbx.mdp3_test_data.mbp-10.dbn.zst"
    summary = file_summary(path)
    assert summary.schema == "mbp-10"
    assert summary.record_count == len(databento_records(path)) == 4
    assert summary.instrument_ids == (5482,)
    assert summary.symbols == {"ESH1": (5482,)}


# ------------------------------------------------------------------------------ wrong content


@pytest.mark.parametrize(
    ("name", "schema"),
    [
        ("esu4-glbx-mdp3-20240701-2358-0002.mbp-1.dbn.zst", "mbp-1"),
        ("glbx.mdp3_test_data.mbp-1.dbn.zst", "mbp-1"),
        ("glbx.mdp3_test_data.mbp-10.dbn.zst", "mbp-10"),
    ],
)
def test_non_mbo_files_raise_not_mbo(sample_dir: Path, name: str, schema: str) -> None:
    path = sample_dir / name
    with pytest.raises(NotMboError) as info:
        replay_files([path])
    assert str(info.value) == f"{path}: schema is {schema}, expected mbo"
    assert info.value.path == path


def test_mixed_schema_live_recording_raises_not_mbo(sample_dir: Path) -> None:
    path = sample_dir / "live_test_data.live.dbn.zst"
    with pytest.raises(NotMboError, match="schema is not set"):
        replay_files([path])
    with pytest.raises(UnsupportedFileError, match=r"live_test_data\.live\.dbn\.zst: "):
        file_summary(path)


def _es_zst(sample_dir: Path) -> bytes:
    return (sample_dir / ES_DEC25).read_bytes()


def _plain(sample_dir: Path) -> bytes:
    return (sample_dir / "dbn_test_data.mbo.v3.dbn").read_bytes()


def _flip(data: bytes, at: int, mask: int = 0xFF) -> bytes:
    out = bytearray(data)
    out[at] ^= mask
    return bytes(out)


def _set(data: bytes, at: int, value: int) -> bytes:
    out = bytearray(data)
    out[at] = value
    return bytes(out)


# Each damaged file: (name, builder from the sample dir, expected error, message fragment).
_DAMAGE: list[tuple[str, Callable[[Path], bytes], type[ReplayError], str]] = [
    ("empty.dbn", lambda d: b"", TruncatedFileError, "file is empty"),
    ("random.dbn", lambda d: random.Random(7).randbytes(4096), CorruptFileError, "bad magic"),
    ("random.dbn.zst", lambda d: random.Random(8).randbytes(64), CorruptFileError, "bad magic"),
    ("cut-2.dbn", lambda d: b"DB", TruncatedFileError, "inside the DBN header"),
    ("cut-50.dbn.zst", lambda d: _es_zst(d)[:50], TruncatedFileError, "inside the DBN header"),
    ("cut-300.dbn.zst", lambda d: _es_zst(d)[:300], TruncatedFileError, "inside a zstd frame"),
    ("cut-half.dbn.zst", lambda d: _es_zst(d)[:498_619], TruncatedFileError, "truncated"),
    ("cut-1.dbn.zst", lambda d: _es_zst(d)[:-1], TruncatedFileError, "inside a zstd frame"),
    ("cut-meta.dbn", lambda d: _plain(d)[:40], TruncatedFileError, "inside the DBN metadata"),
    ("cut-rec.dbn", lambda d: _plain(d)[:-10], TruncatedFileError, "inside a record after 1 "),
    ("flip-a.dbn.zst", lambda d: _flip(_es_zst(d), 141_191), CorruptFileError, "corrupt zstd"),
    ("flip-b.dbn.zst", lambda d: _flip(_es_zst(d), 597_153), CorruptFileError, "corrupt zstd"),
    ("flip-c.dbn.zst", lambda d: _flip(_es_zst(d), 40), CorruptFileError, "corrupt zstd"),
    ("tail.dbn.zst", lambda d: _es_zst(d) + b"junk" * 8, CorruptFileError, "corrupt zstd"),
    (
        "not-dbn.dbn.zst",
        lambda d: zstandard.ZstdCompressor().compress(b"hello" * 100),
        CorruptFileError,
        "does not start with the DBN magic",
    ),
    ("rtype.dbn", lambda d: _flip(_plain(d), -56 + 1), CorruptFileError, "record 1 has rtype"),
    ("length.dbn", lambda d: _set(_plain(d), -56, 15), CorruptFileError, "record 1 has rtype"),
    ("action.dbn", lambda d: _set(_plain(d), -56 + 38, ord("Z")), CorruptFileError, "action"),
    ("side.dbn", lambda d: _set(_plain(d), -56 + 39, ord("Q")), CorruptFileError, "side"),
    ("v9.dbn", lambda d: _set(_plain(d), 3, 9), UnsupportedFileError, "DBN version 9"),
]


@pytest.mark.parametrize("case", _DAMAGE, ids=[case[0] for case in _DAMAGE])
def test_damaged_files_raise_their_specific_error(
    sample_dir: Path,
    tmp_path: Path,
    case: tuple[str, Callable[[Path], bytes], type[ReplayError], str],
) -> None:
    name, build, error, fragment = case
    path = tmp_path / name
    path.write_bytes(build(sample_dir))
    for attempt in (lambda: read_all(path), lambda: file_summary(path)):
        with pytest.raises(ReplayError) as info:
            attempt()
        assert type(info.value) is error
        assert str(info.value).startswith(f"{path}: ")
        assert fragment in str(info.value)
        assert info.value.path == path


def test_a_missing_file_is_a_missing_file_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.dbn.zst"
    with pytest.raises(MissingFileError, match=r"nope\.dbn\.zst: no such file") as info:
        replay_files([path])
    assert isinstance(info.value, FileNotFoundError)


def test_a_directory_is_a_replay_error(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="cannot open file"):
        file_summary(tmp_path)


def test_truncated_zstd_is_caught_where_databento_is_silent(
    sample_dir: Path, tmp_path: Path
) -> None:
    """Why replay decodes zstd itself: DBNStore returns every record of a file missing its
    final checksum bytes (and none of one cut after the header) without a word."""
    data = _es_zst(sample_dir)
    assert len(databento.DBNStore.from_bytes(data[:-1]).to_ndarray()) == 68_792
    assert len(databento.DBNStore.from_bytes(data[:300]).to_ndarray()) == 0
    path = tmp_path / "cut.dbn.zst"
    path.write_bytes(data[:-1])
    with pytest.raises(TruncatedFileError, match="after 68792 records"):
        read_all(path)


def test_replay_errors_survive_pickling(tmp_path: Path) -> None:
    errors: list[ReplayError] = [
        TruncatedFileError(tmp_path / "a.dbn", "truncated: x"),
        MissingFileError(tmp_path / "b.dbn", "no such file"),
        OverlappingFilesError(tmp_path / "c.dbn", "overlaps", tmp_path / "d.dbn"),
    ]
    for err in errors:
        copy = pickle.loads(pickle.dumps(err))
        assert type(copy) is type(err)
        assert str(copy) == str(err)
        assert copy.path == err.path
    overlap = pickle.loads(pickle.dumps(errors[2]))
    assert overlap.other_path == tmp_path / "d.dbn"


# ----------------------------------------------------------------------------------- filtering


def _two_instrument_file(tmp_path: Path) -> tuple[Path, EventArray]:
    events = make_events([10 * NS + i for i in range(6)], [1, 2, 1, 2, 2, 1])
    path = write_mbo(
        tmp_path / "two.dbn.zst",
        events,
        start=10 * NS,
        end=20 * NS,
        symbols={"AAA": 1, "BBB": 2},
        zstd=True,
    )
    return path, events


def test_synthetic_writer_produces_dbn_that_databento_reads(tmp_path: Path) -> None:
    path, events = _two_instrument_file(tmp_path)
    ref = databento_records(path)
    for field in EVENT_DTYPE.names or ():
        expected = as_ascii(ref[field]) if field in ("action", "side") else ref[field]
        np.testing.assert_array_equal(events[field], expected, err_msg=field)
    np.testing.assert_array_equal(read_all(path), events)


def test_filter_by_instrument_id_and_by_raw_symbol(tmp_path: Path) -> None:
    path, events = _two_instrument_file(tmp_path)
    by_id = read_all(path, instrument_id=2)
    by_symbol = read_all(path, raw_symbol="BBB")
    expected = events[events["instrument_id"] == 2]
    assert len(expected) == 3
    np.testing.assert_array_equal(by_id, expected)
    np.testing.assert_array_equal(by_symbol, expected)
    np.testing.assert_array_equal(
        read_all(path, raw_symbol="AAA"), events[events["instrument_id"] == 1]
    )


def test_es_raw_symbol_resolves_to_its_instrument(sample_dir: Path) -> None:
    path = sample_dir / ES_DEC25
    assert file_summary(path).symbols["ESH4"] == (ESH4_ID,)
    by_symbol = read_all(path, raw_symbol="ESH4")
    assert len(by_symbol) == 68_792
    np.testing.assert_array_equal(by_symbol, read_all(path, instrument_id=ESH4_ID))


def test_unknown_symbol_names_the_file_and_its_symbols(sample_dir: Path) -> None:
    path = sample_dir / ES_DEC25
    with pytest.raises(UnknownInstrumentError) as info:
        replay_files([path], raw_symbol="NQH4")
    message = str(info.value)
    assert message.startswith(f"{path}: raw symbol 'NQH4' is not in this file's symbology")
    assert "ESH4 -> [17077]" in message


def test_unknown_instrument_id_names_the_file(sample_dir: Path) -> None:
    path = sample_dir / ES_DEC25
    with pytest.raises(
        UnknownInstrumentError, match=r"20231225\.mbo\.dbn\.zst: instrument id 5482"
    ):
        replay_files([path], instrument_id=5482)


def test_a_symbol_missing_from_one_of_several_files_is_an_error(sample_dir: Path) -> None:
    esm4 = sample_dir / "esm4-glbx-mdp3-20240508-0000-0002.mbo.dbn.zst"
    with pytest.raises(UnknownInstrumentError, match=r"esm4-.*'ESH4'.*ESM4 -> \[5602\]"):
        replay_files([sample_dir / ES_DEC25, esm4], raw_symbol="ESH4")


def test_session_window_end_keeps_every_record_before_it(sample_dir: Path) -> None:
    path = sample_dir / ES_DEC25
    # CME reopens after Christmas at 17:00 Chicago (23:00 UTC); the snapshot is at 00:00 UTC.
    start, end = session_window_ns("2023-12-25T17:00", "2023-12-25T17:30", "America/Chicago")
    assert start == 1_703_545_200 * NS  # 2023-12-25T23:00:00Z
    events = read_all(path, end_ns=end)
    ref = databento_records(path)
    expected = ref[ref["ts_recv"] < end]
    assert len(expected) < len(ref)
    np.testing.assert_array_equal(events["ts_recv"], expected["ts_recv"])
    np.testing.assert_array_equal(events["order_id"], expected["order_id"])
    # The snapshot and the pre-open before the session start are all there to build the book.
    assert int(((events["flags"] & F_SNAPSHOT) != 0).sum()) == 8_725
    assert int((events["ts_recv"] < start).sum()) == 8_725 + 924


def test_window_end_stops_reading_before_later_damage(sample_dir: Path, tmp_path: Path) -> None:
    # The first half of the file decodes; a window that ends before the cut never reaches it.
    path = tmp_path / "half.dbn.zst"
    path.write_bytes(_es_zst(sample_dir)[:498_619])
    end = 1_703_545_200 * NS  # 23:00 UTC: snapshot + pre-open only
    events = read_all(path, end_ns=end)
    ref = databento_records(sample_dir / ES_DEC25)
    assert len(events) == int((ref["ts_recv"] < end).sum()) == 8_725 + 924
    with pytest.raises(TruncatedFileError):
        read_all(path)


def test_window_ending_before_the_data_yields_nothing(sample_dir: Path) -> None:
    assert len(read_all(sample_dir / "dbn_test_data.mbo.v3.dbn", end_ns=1)) == 0


def test_filter_arguments_are_validated(sample_dir: Path) -> None:
    path = sample_dir / ES_DEC25
    with pytest.raises(ValueError, match="not both"):
        replay_files([path], instrument_id=ESH4_ID, raw_symbol="ESH4")
    with pytest.raises(ValueError, match="batch_size"):
        replay_files([path], batch_size=0)
    with pytest.raises(ValueError, match="no files"):
        replay_files([])


# --------------------------------------------------------------------------------- file order


def test_files_come_out_in_time_order_whatever_order_they_are_given(sample_dir: Path) -> None:
    dec24, dec25 = sample_dir / ES_DEC24, sample_dir / ES_DEC25
    events = read_all(dec25, dec24)
    expected = np.concatenate([read_all(dec24), read_all(dec25)])
    assert len(events) == 8_725 + 68_792
    np.testing.assert_array_equal(events, expected)
    assert (np.diff(events["ts_recv"].astype(np.int64)) >= 0).all()


def test_files_with_overlapping_ranges_are_rejected_naming_both(sample_dir: Path) -> None:
    v2, v3 = sample_dir / "dbn_test_data.mbo.v2.dbn", sample_dir / "dbn_test_data.mbo.v3.dbn"
    with pytest.raises(OverlappingFilesError) as info:
        replay_files([v3, v2])
    assert str(v2) in str(info.value)
    assert str(v3) in str(info.value)
    assert {info.value.path, info.value.other_path} == {v2, v3}


def test_an_open_ended_file_must_be_last(tmp_path: Path) -> None:
    live = write_mbo(
        tmp_path / "live.dbn", make_events([10 * NS]), start=10 * NS, end=None, symbols={"X": 1}
    )
    later = write_mbo(
        tmp_path / "later.dbn", make_events([30 * NS]), start=30 * NS, end=40 * NS, symbols={"X": 1}
    )
    with pytest.raises(OverlappingFilesError, match="no end time"):
        replay_files([live, later])
    assert len(read_all(live)) == 1


def test_records_overlapping_across_files_are_caught_while_streaming(tmp_path: Path) -> None:
    # Headers claim disjoint ranges, but the first file's records run past the second's.
    a = write_mbo(
        tmp_path / "a.dbn",
        make_events([10 * NS, 25 * NS]),
        start=10 * NS,
        end=20 * NS,
        symbols={"X": 1},
    )
    b = write_mbo(
        tmp_path / "b.dbn",
        make_events([21 * NS, 30 * NS]),
        start=20 * NS,
        end=40 * NS,
        symbols={"X": 1},
    )
    stream = replay_files([b, a], batch_size=1)
    assert len(next(stream)) == 1
    with pytest.raises(OverlappingFilesError, match="overlap in time") as info:
        list(stream)
    assert (info.value.path, info.value.other_path) == (b, a)


def test_records_out_of_order_inside_a_file_are_rejected(tmp_path: Path) -> None:
    path = write_mbo(
        tmp_path / "unsorted.dbn",
        make_events([10 * NS, 12 * NS, 11 * NS]),
        start=10 * NS,
        end=20 * NS,
        symbols={"X": 1},
    )
    with pytest.raises(UnsortedFileError, match=r"unsorted\.dbn: record 2 goes back in ts_recv"):
        read_all(path)


# ------------------------------------------------------------------------------ session window


def test_session_window_across_spring_forward_is_22_hours() -> None:
    # DST starts 2024-03-10 02:00 in Chicago: CST (-6) at the start, CDT (-5) at the end.
    start, end = session_window_ns("2024-03-09T17:00", "2024-03-10T16:00", "America/Chicago")
    assert start == int(datetime(2024, 3, 9, 23, 0, tzinfo=UTC).timestamp()) * NS
    assert end == int(datetime(2024, 3, 10, 21, 0, tzinfo=UTC).timestamp()) * NS
    assert end - start == 22 * 3_600 * NS


def test_session_window_across_fall_back_is_24_hours() -> None:
    start, end = session_window_ns(
        datetime(2024, 11, 2, 17, 0), datetime(2024, 11, 3, 16, 0), "America/Chicago"
    )
    assert end - start == 24 * 3_600 * NS
    assert end == int(datetime(2024, 11, 3, 22, 0, tzinfo=UTC).timestamp()) * NS


def test_session_window_keeps_nanosecond_precision_and_aware_inputs() -> None:
    start, end = session_window_ns(
        "2023-12-25T17:00:00.000001", "2023-12-26T00:00:00+00:00", "America/Chicago"
    )
    assert start == 1_703_545_200 * NS + 1_000
    assert end == 1_703_548_800 * NS


@pytest.mark.parametrize(
    ("start", "end", "tz", "message"),
    [
        ("2024-03-10T02:30", "2024-03-10T16:00", "America/Chicago", "does not exist"),
        ("2024-11-03T01:30", "2024-11-03T16:00", "America/Chicago", "ambiguous"),
        ("2023-12-25T17:00", "2023-12-25T16:00", "America/Chicago", "must be after"),
        ("2023-12-25T17:00", "2023-12-25T17:00", "America/Chicago", "must be after"),
        ("2023-12-25T17:00", "2023-12-26T16:00", "Mars/Olympus_Mons", "unknown time zone"),
        ("yesterday", "2023-12-26T16:00", "America/Chicago", "not an ISO datetime"),
    ],
)
def test_session_window_rejects_bad_input(start: str, end: str, tz: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        session_window_ns(start, end, tz)


def test_an_ambiguous_time_with_an_offset_is_accepted() -> None:
    start, end = session_window_ns(
        "2024-11-03T01:30-05:00", "2024-11-03T01:30-06:00", "America/Chicago"
    )
    assert end - start == 3_600 * NS


# ------------------------------------------------------------------------------------- pacing


class FakeClock:
    """A clock that only moves when slept on (or when a test says time passed)."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _paced_slices(
    batches: list[EventArray], speed: float, fake: FakeClock, **kwargs: Any
) -> Iterator[tuple[float, EventArray]]:
    for piece in paced(batches, speed, clock=fake.clock, sleep=fake.sleep, **kwargs):
        yield fake.now, piece


def test_paced_sleeps_the_scaled_gaps_and_splits_batches() -> None:
    base = 1_700_000_000 * NS
    events = make_events([base, base, base + NS, base + 3 * NS // 2, base + 3 * NS])
    fake = FakeClock()
    slices = list(_paced_slices([events[:3], events[3:]], 10.0, fake))
    assert [len(s) for _, s in slices] == [2, 1, 1, 1]
    assert fake.sleeps == pytest.approx([0.1, 0.05, 0.15])
    assert [t - 1_000.0 for t, _ in slices] == pytest.approx([0.0, 0.1, 0.15, 0.3])
    np.testing.assert_array_equal(np.concatenate([s for _, s in slices]), events)


def test_paced_does_not_sleep_for_a_consumer_that_is_behind() -> None:
    events = make_events([0, NS, 2 * NS, 3 * NS])
    fake = FakeClock()
    got = 0
    for piece in paced([events], 1.0, clock=fake.clock, sleep=fake.sleep):
        got += len(piece)
        fake.now += 1.5  # the consumer works longer than the gap to the next event
    assert got == 4
    assert fake.sleeps == []  # it catches up on the absolute schedule instead of drifting


def test_paced_replay_of_a_real_file_is_never_early_and_barely_late(sample_dir: Path) -> None:
    path = sample_dir / "esm4-glbx-mdp3-20240508-0000-0002.mbo.dbn.zst"
    batches = list(replay_files([path], batch_size=4_096))
    ts = np.concatenate(batches)["ts_recv"]
    speed, resolution = 50.0, 0.002
    fake = FakeClock(now=0.0)
    delivered = 0
    for now, piece in _paced_slices(batches, speed, fake, resolution_s=resolution):
        due = (piece["ts_recv"].astype(np.int64) - int(ts[0])) / (speed * NS)
        assert (due <= now + 1e-9).all()  # nobody receives an event before its scaled time
        assert (due >= now - resolution - 1e-9).all()  # and at most one resolution late
        delivered += len(piece)
    assert delivered == len(ts)
    assert fake.now == pytest.approx((int(ts[-1]) - int(ts[0])) / (speed * NS))
    assert sum(fake.sleeps) == pytest.approx(fake.now)


def test_paced_ignores_empty_batches_and_steps_back_in_time() -> None:
    events = make_events([5 * NS, 4 * NS, 6 * NS])  # the second event is already due
    fake = FakeClock()
    empty = np.empty(0, dtype=EVENT_DTYPE)
    slices = list(_paced_slices([empty, events, empty], 1.0, fake))
    assert [len(s) for _, s in slices] == [2, 1]
    assert fake.sleeps == pytest.approx([1.0])


@pytest.mark.parametrize("speed", [0.0, -1.0, math.nan, math.inf])
def test_paced_rejects_a_speed_that_is_not_positive(speed: float) -> None:
    with pytest.raises(ValueError, match="speed must be"):
        paced([], speed)
