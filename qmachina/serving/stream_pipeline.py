"""The serving stream's pipeline: one serving version computed from one source, shared by every
client watching it.

**What runs.** A :class:`StreamPipeline` replays the version's dataset (its pipeline's files,
instrument and session window, checked against the sha256 its lineage recorded) on the wall
clock and runs it through the engine code the offline path runs: the book and silver grid
(:class:`~engine.silver.SilverBuilder` with :func:`~qmachina.silver_build.grid_config_of`),
incremental gold (:class:`~engine.gold.runtime.IncrementalGold`, proved equal to the batch gold
an experiment computes) and the signal (:class:`CausalScorer`). Each bin becomes a
``grid_update`` and a ``gold_update`` frame (:mod:`qmachina.serving.wire`), encoded once and
handed to every subscriber. Records before the session start, and bins before the stream's
``start``, are computed as fast as they can be (the book, gold and signal state at the first
streamed bin are exactly the offline ones) and not streamed; from there the replay is paced
(:func:`engine.replay.paced`).

**Live sources.** ``StreamSource(kind="live", session_id=...)`` reads a live session's bronze
instead (:mod:`qmachina.serving.live_source`): from its first record, following the files as
they grow, unpaced, with no session window (bins open at the first record after the opening
snapshot) and no end. It streams in *segments*, one per contract: when the session rolls the
contract the stream serves, the segment ends (its open bin closed and sent), a fresh
computation starts on the new contract from the bronze's start, and every subscriber is sent a
new ``runtime_config`` (:func:`runtime_config_message`, with a ``live`` section naming the
contract) before the new segment's first frame; its bins start after the old segment's last.

**Sharing.** A :class:`StreamHub` holds at most one pipeline per (version id, source): the first
subscriber starts it, later ones join it where it is, the last one to leave stops it (and a
pipeline that reaches the end of its data ends every subscription). The compute runs in a thread
of its own; the event loop only moves encoded frames.

**Slow clients.** Every subscription has a bounded queue of frames. The pipeline never waits for
a client: a frame offered to a full queue pushes out the oldest one (drop-oldest: a client that
falls behind sees the present, not an ever older past) and counts it in the subscription's
``dropped``; the route reports that counter to the client, and the hub keeps the totals.

**The signal, bin by bin.** Signals are written as causal functions over a whole series (the
score of bin t reads bins <= t only), so the score of the newest bin is the last value of the
signal over the bins so far. :class:`CausalScorer` keeps the bins a score reads, and no more: a
signal may declare ``history_bins(params)`` (the trailing bins its score reads); for the shipped
signals whose memory is finite the count is known here (:data:`FINITE_HISTORY`); any other signal
is rescored over the whole history each bin, which is exact but grows with the session.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from engine.events import F_SNAPSHOT
from engine.gold.graph import Kind
from engine.gold.runtime import GoldBin, IncrementalGold, silver_bins
from engine.replay import EventArray, in_zone, paced, replay_files
from engine.signals.builtin import load_builtin_signals
from engine.signals.registry import ParamValue, SignalInputs, get_signal
from engine.silver import SilverBuilder
from engine.silver_frame import SilverFrame
from qmachina.serving import wire
from qmachina.serving.live_source import (
    DEFAULT_POLL_SECONDS,
    DEFAULT_ROLL_POLL_SECONDS,
    Contract,
    LiveSegment,
    LiveSessionSource,
    SessionRoll,
)
from qmachina.serving.snapshot import ServingSnapshot
from qmachina.silver_build import grid_config_of, sha256_of
from qmachina.specs.identity import spec_hash
from qmachina.specs.pipeline import PipelineIdentity, ResolvedPipeline, ResolvedSession

log = logging.getLogger(__name__)

DEFAULT_QUEUE_FRAMES = 256
"""Frames queued per client before the oldest is dropped: two per bin, so 12.8 s of 100 ms bins
at speed 1."""
MAX_SPEED = 1_000_000.0

FINITE_HISTORY: Mapping[str, Callable[[Mapping[str, ParamValue]], int]] = {
    # D1..D3 reach 3 bins back from net(t); robust z reads z_window of them.
    "derivative": lambda params: int(params["z_window"]) + 3,
    # One bin's gold grid around that bin's spot.
    "flow_threshold": lambda params: 1,
}
"""The trailing bins the score of a bin reads, for shipped signals that do not declare it
themselves (``history_bins``); the stream's parity test proves the count for the derivative."""

_COMBINE_EVERY_CHUNKS = 64
ROLL_READ_TIMEOUT_SECONDS = 10.0

RollSource = Callable[[], Coroutine[Any, Any, Sequence[SessionRoll]]]
"""Reads a live session's recorded rolls (from the store), on the event loop."""


class StreamError(RuntimeError):
    """A serving version that cannot be streamed from its source; the message says why."""


class DatasetChangedError(StreamError):
    """A dataset file is not the one the version's lineage recorded."""


# ----------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class StreamSource:
    """Where a pipeline's events come from: the version's dataset replayed at ``speed`` times
    real time (``replay``), or the bronze of live session ``session_id`` as it grows (``live``,
    real time by nature: ``speed`` stays 1). Either streams from the first bin starting at or
    after ``start_ns`` (None: the first bin of the session). Both yield the same event batches,
    and a source is part of its pipeline's key: a live session is never a replay."""

    kind: Literal["replay", "live"] = "replay"
    speed: float = 1.0
    start_ns: int | None = None
    session_id: str | None = None

    def __post_init__(self) -> None:
        if not (0.0 < self.speed <= MAX_SPEED):
            raise ValueError(f"speed must be > 0 and at most {MAX_SPEED:g}, got {self.speed}")
        if (self.kind == "live") != (self.session_id is not None):
            raise ValueError("a live source names its session_id, and only a live source does")
        if self.kind == "live" and self.speed != 1.0:
            raise ValueError("a live source is not paced: its speed is 1")


def resolved_pipeline(snapshot: ServingSnapshot, data_root: Path) -> ResolvedPipeline:
    """The version's pipeline as ``resolve_pipeline`` would give it, from the snapshot alone:
    its dataset files under ``data_root``, its session placed in the instrument's zone. Raises
    :class:`StreamError` when the result is not the pipeline the snapshot names (its hash)."""
    pipeline = snapshot.content.pipeline
    spec, instrument = pipeline.spec, pipeline.instrument
    session = None
    if spec.capture.session is not None:
        window = spec.capture.session
        try:
            session = ResolvedSession(
                start=in_zone(window.start, instrument.zone),
                end=in_zone(window.end, instrument.zone),
            )
        except ValueError as error:
            raise StreamError(f"the session window cannot be placed: {error}") from None
    portable = tuple(
        PurePath(name).name if PurePath(name).is_absolute() else PurePath(name).as_posix()
        for name in spec.capture.dataset_files
    )
    identity = PipelineIdentity(
        instrument=instrument, capture=spec.capture.model_copy(update={"dataset_files": portable})
    )
    if spec_hash(identity) != pipeline.pipeline_hash:
        raise StreamError(
            f"the snapshot's pipeline does not hash to its pipeline_hash {pipeline.pipeline_hash}"
        )
    return ResolvedPipeline(
        spec=spec,
        spec_file=Path(snapshot.lineage.spec_file),
        instrument_file=Path(spec.instrument),
        instrument=instrument,
        engine=instrument.engine_settings(),
        dataset_paths=tuple((data_root / name).absolute() for name in spec.capture.dataset_files),
        session=session,
        identity=identity,
        pipeline_hash=pipeline.pipeline_hash,
    )


def check_dataset(snapshot: ServingSnapshot, pipeline: ResolvedPipeline) -> None:
    """Every dataset file exists and, when the version was evaluated on this pipeline's own
    data, is byte for byte the one its lineage recorded (sha256 and size)."""
    for path in pipeline.dataset_paths:
        if not path.is_file():
            raise StreamError(f"dataset file {path} not found")
    lineage = snapshot.lineage
    if lineage.dataset_pipeline_hash != pipeline.pipeline_hash:
        return  # evaluated on another pipeline's data; its files are not the ones replayed
    for recorded, path in zip(lineage.dataset_files, pipeline.dataset_paths, strict=True):
        size = path.stat().st_size
        if size != recorded.size_bytes or sha256_of(path) != recorded.sha256:
            raise DatasetChangedError(
                f"dataset file {recorded.name} changed since serving version "
                f"{snapshot.version_id[:12]} was registered (sha256 {recorded.sha256[:12]}...)"
            )


class _StopRequestedError(Exception):
    """Raised out of the pacing sleep when the pipeline is stopped."""


def source_events(
    pipeline: ResolvedPipeline, source: StreamSource, stop: threading.Event
) -> Iterator[EventArray]:
    """The pipeline's events, as ``build_silver`` reads them: records before the pacing origin
    at once, the rest paced. The origin is the later of the session start and the source's
    start; with neither, the first record after the opening snapshot (a snapshot restates the
    book as of the file's start, often hours before the market next moves: no time to wait
    through)."""
    capture = pipeline.spec.capture
    session = pipeline.session
    batches = replay_files(
        pipeline.dataset_paths,
        instrument_id=capture.instrument_id,
        raw_symbol=capture.raw_symbol,
        end_ns=session.end_ns if session else None,
    )
    origins = [ns for ns in (session.start_ns if session else None, source.start_ns) if ns]
    pace_from = np.uint64(max(origins)) if origins else None
    rest: list[EventArray] = []
    for batch in batches:
        if pace_from is None:
            live = np.flatnonzero((batch["flags"] & F_SNAPSHOT) == 0)
            cut = int(live[0]) if len(live) else len(batch)
        else:
            cut = int(np.searchsorted(batch["ts_recv"], pace_from))  # ts_recv never decreases
        if cut:
            yield batch[:cut]
        if cut < len(batch):
            rest = [batch[cut:]]
            break

    def sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise _StopRequestedError

    yield from paced(itertools.chain(rest, batches), source.speed, sleep=sleep)


# --------------------------------------------------------------------------- the signal


def signal_history_bins(name: str, params: Mapping[str, ParamValue]) -> int | None:
    """The trailing bins the score of a bin reads (None: the whole history)."""
    declared = getattr(get_signal(name), "history_bins", None)
    if callable(declared):
        count = declared(params)
        return None if count is None else int(count)
    known = FINITE_HISTORY.get(name)
    return known(params) if known is not None else None


class _GoldHistory(Mapping[str, np.ndarray]):
    """Gold outputs over the scorer's frame, densified when a signal reads them: a grid as
    ``[n_bins, n_ticks]`` on the frame's columns (NaN outside each bin's window, as batch gold
    has it), a series as ``[n_bins]``."""

    def __init__(self, frame: SilverFrame, bins: Sequence[GoldBin], kinds: Mapping[str, Kind]):
        self._frame = frame
        self._bins = bins
        self._kinds = kinds
        self._dense: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._kinds:
            raise KeyError(name)
        dense = self._dense.get(name)
        if dense is None:
            dense = self._densify(name)
            self._dense[name] = dense
        return dense

    def _densify(self, name: str) -> np.ndarray:
        if self._kinds[name] is Kind.SERIES:
            return np.array([gold.series[name] for gold in self._bins], dtype=np.float64)
        frame = self._frame
        dense = np.full((frame.n_bins, frame.n_ticks), np.nan)
        for row, gold in enumerate(self._bins):
            values = gold.grids[name]
            if len(values):
                column = gold.first_tick - frame.first_tick
                dense[row, column : column + len(values)] = values
        return dense

    def __contains__(self, name: object) -> bool:
        return name in self._kinds  # without densifying, as Mapping's default would

    def __iter__(self) -> Iterator[str]:
        return iter(self._kinds)

    def __len__(self) -> int:
        return len(self._kinds)


@dataclass(frozen=True)
class TradeGeometry:
    """What a signal that learns labels reads besides silver and gold (``SignalInputs``)."""

    tp_ticks: int = 8
    sl_ticks: int = 4
    max_hold_bins: int = 600


class CausalScorer:
    """The signal's score bin by bin: ``push`` a bin's silver row and gold, get its score,
    exactly the value the signal gives that bin over the whole series (see the module's
    docstring)."""

    def __init__(
        self,
        signal: str,
        params: Mapping[str, ParamValue],
        *,
        tick_size: int,
        kinds: Mapping[str, Kind],
        geometry: TradeGeometry = TradeGeometry(),
    ) -> None:
        load_builtin_signals()
        self.signal = get_signal(signal)
        self.params = dict(params)
        self.history_bins = signal_history_bins(signal, params)
        self.tick_size = tick_size
        self.kinds = dict(kinds)
        self.geometry = geometry
        self._silver: pa.Table | None = None
        self._gold: deque[GoldBin] = deque(maxlen=self.history_bins)

    def push(self, silver_row: pa.RecordBatch, gold: GoldBin) -> float:
        """The score of the bin whose one-row silver batch and gold are given."""
        row = pa.Table.from_batches([silver_row])
        table = row if self._silver is None else pa.concat_tables([self._silver, row])
        if self.history_bins is not None and table.num_rows > self.history_bins:
            table = table.slice(table.num_rows - self.history_bins)
        if table.column(0).num_chunks > _COMBINE_EVERY_CHUNKS:
            table = table.combine_chunks()
        self._silver = table
        self._gold.append(gold)
        frame = SilverFrame(table, self.tick_size)
        inputs = SignalInputs(
            frame=frame,
            gold=_GoldHistory(frame, self._gold, self.kinds),
            tp_ticks=self.geometry.tp_ticks,
            sl_ticks=self.geometry.sl_ticks,
            max_hold_bins=self.geometry.max_hold_bins,
        )
        scores = self.signal.score(inputs, self.params)
        return float(scores[-1])


def trade_geometry(snapshot: ServingSnapshot) -> TradeGeometry:
    """The experiment run's trade geometry for a version registered from one, else the
    defaults of ``SignalInputs``."""
    point = snapshot.lineage.run_point
    if point is None:
        return TradeGeometry()
    return TradeGeometry(point.tp_ticks, point.sl_ticks, point.max_hold_bins)


# ------------------------------------------------------------------------ the computation


@dataclass(frozen=True)
class BinFrames:
    """One bin on the wire: its ``grid_update`` and ``gold_update`` frames."""

    bin_seq: int
    grid_update: bytes
    gold_update: bytes


class ServingComputation:
    """A serving version's computation over its events, bin by bin (no I/O, no threads)."""

    def __init__(self, snapshot: ServingSnapshot, pipeline: ResolvedPipeline) -> None:
        content = snapshot.content
        self.pipeline = pipeline
        session = pipeline.session
        self.builder = SilverBuilder(
            grid_config_of(pipeline), session_start_ns=session.start_ns if session else None
        )
        self.gold = IncrementalGold(content.gold.spec.graph())
        self.kinds = dict(self.gold.program.output_kinds)
        self.scorer = CausalScorer(
            content.signal.name,
            content.signal.params,
            tick_size=content.pipeline.instrument.tick_size_raw,
            kinds=self.kinds,
            geometry=trade_geometry(snapshot),
        )
        self.grid_encoder = wire.GridEncoder(snapshot, self.builder.schema)
        self.gold_encoder = wire.GoldEncoder(snapshot, self.kinds)
        self.bins = 0

    def feed(self, events: EventArray) -> Iterator[tuple[pa.RecordBatch, GoldBin, float]]:
        """The bins the events close, each with its gold and score."""
        # A stream cannot wait for an output buffer to fill, nor for the end of a large batch
        # (live data that arrived all at once): bins leave as soon as their slice is done.
        for batches in self.builder.feed_promptly(events):
            yield from self._bins(batches)

    def finish(self) -> Iterator[tuple[pa.RecordBatch, GoldBin, float]]:
        """The bins left at the end of the data (up to the session end, as the offline build)."""
        session = self.pipeline.session
        yield from self._bins(self.builder.finish(until_ns=session.end_ns if session else None))

    def _bins(
        self, batches: Iterable[pa.RecordBatch]
    ) -> Iterator[tuple[pa.RecordBatch, GoldBin, float]]:
        for batch in batches:
            for index in range(batch.num_rows):
                row = batch.slice(index, 1)
                (silver,) = silver_bins(row, self.gold.source_fields)
                gold = self.gold.push(silver)
                score = self.scorer.push(row, gold)
                self.bins += 1
                yield row, gold, score

    def frames(self, row: pa.RecordBatch, gold: GoldBin, score: float) -> BinFrames:
        """The wire frames of a bin."""
        bin_seq = int(row.column("bin_seq")[0].as_py())
        return BinFrames(
            bin_seq, self.grid_encoder.encode(row), self.gold_encoder.encode(bin_seq, gold, score)
        )


# ---------------------------------------------------------------------- fan-out to clients


@dataclass(frozen=True)
class StreamEnd:
    """How a pipeline ended: the bins it produced and the error that stopped it, if any."""

    bins: int
    error: str | None = None


@dataclass(frozen=True)
class LiveInfo:
    """What the runtime_config says about a live segment: its session, its place among the
    session's segments, its contract and the roll that started it."""

    session_id: str
    segment: int
    contract: Contract
    rolled_from: Contract | None = None
    roll_ts_ns: int | None = None


@dataclass(frozen=True)
class StreamStart:
    """What a subscriber learns once the pipeline is ready, and again at every new live
    segment: what the runtime_config needs."""

    kinds: Mapping[str, Kind]
    source: wire.SourceInfo
    live: LiveInfo | None = None


def runtime_config_message(
    snapshot: ServingSnapshot, start: StreamStart, *, alias: str | None, queue_frames: int
) -> str:
    """The ``runtime_config`` of a stream (:func:`wire.runtime_config`); for a live segment
    also its contract (``instrument.instrument_id`` and ``instrument.contract``) and a
    ``live`` section (session, segment, the roll that started it)."""
    text = wire.runtime_config(
        snapshot, alias=alias, kinds=start.kinds, source=start.source, queue_frames=queue_frames
    )
    live = start.live
    if live is None:
        return text
    message = json.loads(text)
    message["instrument"]["instrument_id"] = live.contract.instrument_id
    message["instrument"]["contract"] = live.contract.symbol
    rolled_from = live.rolled_from
    message["live"] = {
        "session_id": live.session_id,
        "segment": live.segment,
        "roll": None
        if rolled_from is None
        else {
            "ts_event": live.roll_ts_ns,
            "from_instrument_id": rolled_from.instrument_id,
            "from_contract": rolled_from.symbol,
        },
    }
    return json.dumps(message, allow_nan=False, separators=(",", ":"))


class Subscription:
    """One client's place on a pipeline: a bounded queue of frames, oldest dropped first, and
    the starts of new live segments among them (never dropped: each says what follows)."""

    def __init__(self, pipeline: StreamPipeline, max_frames: int) -> None:
        if max_frames < 1:
            raise ValueError(f"a subscription queues at least one frame, got {max_frames}")
        self.pipeline = pipeline
        self.max_frames = max_frames
        self.dropped = 0
        self._frames: deque[bytes | StreamStart] = deque()
        self._queued_frames = 0
        self._wakeup = asyncio.Event()
        self._end: StreamEnd | None = None

    def offer(self, frame: bytes) -> None:
        """Queue a frame, pushing out the oldest when the queue is full. Never waits."""
        if self._queued_frames >= self.max_frames:
            self._drop_oldest_frame()
            self.dropped += 1
            self.pipeline.hub.dropped_frames += 1
        self._frames.append(frame)
        self._queued_frames += 1
        self._wakeup.set()

    def offer_start(self, start: StreamStart) -> None:
        """Queue the start of a new segment: the frames after it are the new segment's."""
        self._frames.append(start)
        self._wakeup.set()

    def _drop_oldest_frame(self) -> None:
        if isinstance(self._frames[0], bytes):
            self._frames.popleft()
        else:  # a segment start heads the queue: keep it, drop the first frame after it
            index = next(i for i, item in enumerate(self._frames) if isinstance(item, bytes))
            del self._frames[index]
        self._queued_frames -= 1

    def end(self, end: StreamEnd) -> None:
        """No frame follows; what is queued is still delivered."""
        self._end = end
        self._wakeup.set()

    async def next(self) -> bytes | StreamStart | StreamEnd:
        """The oldest queued frame or segment start, else the end once the pipeline ended,
        else wait."""
        while True:
            if self._frames:
                item = self._frames.popleft()
                if isinstance(item, bytes):
                    self._queued_frames -= 1
                return item
            if self._end is not None:
                return self._end
            self._wakeup.clear()
            await self._wakeup.wait()

    async def started(self) -> StreamStart:
        """Wait until the pipeline is ready to compute (the start of its current segment for
        one joining later); :class:`StreamError` if it cannot."""
        current = self.pipeline.current_start
        if current is not None:
            return current
        return await asyncio.shield(self.pipeline.start_future)


class StreamPipeline:
    """One serving version from one source, computed in a thread, fanned out to subscribers."""

    def __init__(
        self,
        hub: StreamHub,
        snapshot: ServingSnapshot,
        source: StreamSource,
        loop: asyncio.AbstractEventLoop,
        rolls: RollSource | None = None,
    ) -> None:
        self.hub = hub
        self.snapshot = snapshot
        self.source = source
        self.key = (snapshot.version_id, source)
        self.subscribers: set[Subscription] = set()
        self.bins_streamed = 0
        self.ended: StreamEnd | None = None
        self.start_future: asyncio.Future[StreamStart] = loop.create_future()
        self.current_start: StreamStart | None = None
        self._loop = loop
        self._rolls = rolls
        self._bins_computed = 0  # by the computations of segments that ended
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"serving-stream-{snapshot.version_id[:12]}", daemon=True
        )

    # -- the event loop's side --------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the computation to stop; it does at its next slice of events or pacing wait."""
        self._stop.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _publish(self, frames: BinFrames) -> None:
        self.bins_streamed += 1
        for subscription in self.subscribers:
            subscription.offer(frames.grid_update)
            subscription.offer(frames.gold_update)

    def _started(self, start: StreamStart) -> None:
        self.current_start = start
        if not self.start_future.done():
            self.start_future.set_result(start)
            return
        for subscription in self.subscribers:
            subscription.offer_start(start)

    def _ended(self, end: StreamEnd) -> None:
        self.ended = end
        if not self.start_future.done():
            self.start_future.set_exception(StreamError(end.error or "the stream ended"))
            self.start_future.exception()  # retrieved here; subscribers see it through shield
        for subscription in self.subscribers:
            subscription.end(end)
        self.hub._forget(self)

    # -- the computation's thread -----------------------------------------------------------

    def _call(self, callback: Callable[..., None], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed under us (shutdown): nobody is listening
            self._stop.set()

    def _run(self) -> None:
        computation: ServingComputation | None = None
        error: str | None = None
        try:
            pipeline = resolved_pipeline(self.snapshot, self.hub.data_root)
            if self.source.kind == "live":
                self._compute_live(pipeline)
                raise _StopRequestedError  # a live source ends only when it is stopped
            check_dataset(self.snapshot, pipeline)
            computation = ServingComputation(self.snapshot, pipeline)
            session = pipeline.session
            self._call(
                self._started,
                StreamStart(
                    kinds=computation.kinds,
                    source=wire.SourceInfo(
                        kind=self.source.kind,
                        speed=self.source.speed,
                        start_ns=self.source.start_ns,
                        session_start_ns=session.start_ns if session else None,
                        session_end_ns=session.end_ns if session else None,
                        dataset_files=pipeline.spec.capture.dataset_files,
                    ),
                ),
            )
            self._compute(computation, pipeline)
        except _StopRequestedError:
            pass
        except Exception as exc:  # any failure ends the stream for every subscriber, with why
            log.exception("serving stream %s failed", self.snapshot.version_id)
            error = str(exc) or type(exc).__name__
        bins = self._bins_computed + (computation.bins if computation else 0)
        self._call(self._ended, StreamEnd(bins, error))

    def _compute(self, computation: ServingComputation, pipeline: ResolvedPipeline) -> None:
        start_ns = self.source.start_ns
        stop = self._stop
        for events in source_events(pipeline, self.source, stop):
            for row, gold, score in computation.feed(events):
                if start_ns is None or int(row.column("bin_start_ns")[0].as_py()) >= start_ns:
                    self._call(self._publish, computation.frames(row, gold, score))
            if stop.is_set():
                return
        for row, gold, score in computation.finish():
            if start_ns is None or int(row.column("bin_start_ns")[0].as_py()) >= start_ns:
                self._call(self._publish, computation.frames(row, gold, score))

    def _compute_live(self, pipeline: ResolvedPipeline) -> None:
        """Segment after segment of the live session, each on a fresh computation (see the
        module's docstring); returns when stopped."""
        session_id = self.source.session_id
        root = self.hub.bronze_root
        assert session_id is not None
        if root is None:
            raise StreamError("this server has no bronze root: live sources are not available")
        source = LiveSessionSource(
            root / session_id,
            pipeline.spec.capture,
            self._read_rolls,
            self._stop,
            poll_seconds=self.hub.live_poll_seconds,
            roll_poll_seconds=self.hub.roll_poll_seconds,
        )
        live_pipeline = pipeline.model_copy(update={"session": None})
        after_ns = self.source.start_ns or 0  # bins start at or after this, roll or no roll
        for segment in source.segments():
            computation = ServingComputation(self.snapshot, live_pipeline)
            self._call(self._started, self._live_start(computation, segment))
            roll_ns = segment.roll_ts_ns
            try:
                for events in segment.events:
                    bins = computation.feed(events)
                    after_ns = self._publish_live(computation, bins, after_ns, roll_ns)
                if self._stop.is_set():
                    return
                bins = computation.finish()
                after_ns = self._publish_live(computation, bins, after_ns, roll_ns)
            finally:
                self._bins_computed += computation.bins

    def _publish_live(
        self,
        computation: ServingComputation,
        bins: Iterable[tuple[pa.RecordBatch, GoldBin, float]],
        after_ns: int,
        roll_ns: int | None,
    ) -> int:
        """Publish the bins that start at or after ``after_ns`` and end after the roll; the
        end of the last one published (else ``after_ns``)."""
        for row, gold, score in bins:
            start = int(row.column("bin_start_ns")[0].as_py())
            end = int(row.column("bin_end_ns")[0].as_py())
            if start < after_ns or (roll_ns is not None and end <= roll_ns):
                continue
            self._call(self._publish, computation.frames(row, gold, score))
            after_ns = end
        return after_ns

    def _live_start(self, computation: ServingComputation, segment: LiveSegment) -> StreamStart:
        session_id = self.source.session_id
        assert session_id is not None
        return StreamStart(
            kinds=computation.kinds,
            source=wire.SourceInfo(
                kind="live",
                speed=1.0,
                start_ns=self.source.start_ns,
                session_start_ns=segment.session_start_ns,
                session_end_ns=None,
                dataset_files=(),
            ),
            live=LiveInfo(
                session_id, segment.index, segment.contract, segment.rolled_from, segment.roll_ts_ns
            ),
        )

    def _read_rolls(self) -> Sequence[SessionRoll]:
        """The session's recorded rolls, read on the event loop (from the computation's
        thread)."""
        if self._rolls is None:
            return ()
        future = asyncio.run_coroutine_threadsafe(self._rolls(), self._loop)
        return future.result(timeout=ROLL_READ_TIMEOUT_SECONDS)


@dataclass
class StreamHub:
    """The pipelines of one API process, one per (serving version, source)."""

    data_root: Path
    queue_frames: int = DEFAULT_QUEUE_FRAMES
    bronze_root: Path | None = None
    """Where live sessions' bronze lives (``<bronze_root>/<session_id>/``); None: no live."""
    live_poll_seconds: float = DEFAULT_POLL_SECONDS
    """How often a live source looks for appended bronze when it has caught up."""
    roll_poll_seconds: float = DEFAULT_ROLL_POLL_SECONDS
    """How often a live source reads its session's recorded rolls."""
    pipelines: dict[tuple[str, StreamSource], StreamPipeline] = field(default_factory=dict)
    dropped_frames: int = 0
    """Frames dropped for slow clients since the process started, over every pipeline."""
    pipelines_started: int = 0

    def subscribe(
        self, snapshot: ServingSnapshot, source: StreamSource, *, rolls: RollSource | None = None
    ) -> Subscription:
        """A subscription to the version from the source, starting its pipeline if none runs
        (``rolls``: how a new live pipeline reads its session's rolls). Call from the event
        loop."""
        key = (snapshot.version_id, source)
        pipeline = self.pipelines.get(key)
        new = pipeline is None
        if pipeline is None:
            pipeline = self.pipelines[key] = StreamPipeline(
                self, snapshot, source, asyncio.get_running_loop(), rolls
            )
            self.pipelines_started += 1
        subscription = Subscription(pipeline, self.queue_frames)
        pipeline.subscribers.add(subscription)
        if new:
            pipeline.start()  # after the first subscriber is in: it misses no frame
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Leave the pipeline; the last subscriber to leave stops it."""
        pipeline = subscription.pipeline
        pipeline.subscribers.discard(subscription)
        if subscription.dropped:
            log.warning(
                "stream client of %s left having dropped %d frames",
                pipeline.snapshot.version_id[:12],
                subscription.dropped,
            )
        if not pipeline.subscribers:
            pipeline.stop()
            self._forget(pipeline)

    def _forget(self, pipeline: StreamPipeline) -> None:
        if self.pipelines.get(pipeline.key) is pipeline:
            del self.pipelines[pipeline.key]
