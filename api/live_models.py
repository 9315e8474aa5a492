"""Request and response models of ``/v1/ingestion/live/sessions``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from qmachina.live.ingest import HEARTBEAT_BOUNDS_S

LIVE_PATH = "/v1/ingestion/live/sessions"

Symbol = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[!-~]+$")]


class CalendarStepBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    at: datetime = Field(description="From this market time on (ts_event)...")
    symbol: Symbol = Field(description="...this raw symbol is the active contract")


class RollCalendarBody(BaseModel):
    """A schedule of contracts: ``name`` stands for each step's raw symbol from its time on."""

    model_config = ConfigDict(extra="forbid")

    name: Symbol = Field(description="What the session's roll events call the rolling symbol")
    schedule: list[CalendarStepBody] = Field(min_length=1, max_length=100)


class LiveSessionStart(BaseModel):
    """Start ingesting a live feed into the workspace's bronze. The gateway and the API key are
    the deployment's (settings), never the request's."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"dataset": "GLBX.MDP3", "symbols": ["ES.c.0"], "stype_in": "continuous"}]
        },
    )

    dataset: Annotated[str, StringConstraints(pattern=r"^[A-Z0-9]+\.[A-Z0-9]+$")]
    symbols: list[Symbol] = Field(min_length=1, max_length=100)
    stype_in: Literal["raw_symbol", "instrument_id", "continuous", "parent"] = "raw_symbol"
    start: datetime | None = Field(
        default=None, description="Replay from this time on the first connection; null: live now"
    )
    watchdog_seconds: Annotated[
        float,
        Field(
            gt=HEARTBEAT_BOUNDS_S[0],
            le=600,
            description=(
                "Silence that counts as a fault; the gateway is asked for a heartbeat every "
                "half of it (at least 5 s), so it must exceed 5 s"
            ),
        ),
    ] = 10.0
    report_every_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    roll_policy: Literal["mapping", "calendar"] = Field(
        default="mapping",
        description=(
            "What decides the active contract: the gateway's mappings of continuous symbols, "
            "or the schedule in roll_calendar (a raw_symbol subscription to its symbols)"
        ),
    )
    roll_calendar: RollCalendarBody | None = None

    @model_validator(mode="after")
    def _calendar_fits_the_subscription(self) -> Self:
        calendar = self.roll_calendar
        if self.roll_policy == "mapping":
            if calendar is not None:
                raise ValueError("roll_calendar is given but roll_policy is 'mapping'")
            return self
        if calendar is None:
            raise ValueError("roll_policy 'calendar' needs a roll_calendar")
        if self.stype_in != "raw_symbol":
            raise ValueError(
                f"roll_policy 'calendar' needs stype_in raw_symbol, not {self.stype_in}"
            )
        missing = sorted({step.symbol for step in calendar.schedule} - set(self.symbols))
        if missing:
            raise ValueError(f"roll_calendar.schedule names {missing}, which symbols lacks")
        times = [step.at for step in calendar.schedule]
        if len(set(times)) != len(times):
            raise ValueError("roll_calendar.schedule has two steps at one time")
        return self


class StopBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, StringConstraints(strip_whitespace=True, max_length=1800)] = ""


class InstrumentCheckpointView(BaseModel):
    instrument_id: int
    ts_event: int
    taken_at_ts: int


class RollView(BaseModel):
    symbol: str
    from_instrument_id: int | None
    from_symbol: str | None
    to_instrument_id: int
    to_symbol: str
    reason: str
    ts_event: int


class LiveSessionView(BaseModel):
    id: str
    workspace: str
    dataset: str
    symbols: list[str]
    stype_in: str
    roll_policy: Literal["mapping", "calendar"]
    roll_calendar: RollCalendarBody | None
    created_by: str
    created_at: datetime
    state: Literal["starting", "running", "stopping", "stopped", "failed"]
    connection: Literal["connecting", "connected", "reconnecting", "closed"]
    events_received: int
    records_written: int
    duplicates_dropped: int
    reconnects: int
    lag_ns: int | None
    checkpoint: list[InstrumentCheckpointView]
    contracts: dict[str, str] = Field(description="Each symbol's active contract")
    rolls: list[RollView]
    last_error: str
    error: str = Field(description="Why the session failed, if it did")
    stopped_by: str | None


class LiveSessionSummary(BaseModel):
    id: str
    dataset: str
    symbols: list[str]
    created_by: str
    created_at: datetime


class LiveSessionPage(BaseModel):
    items: list[LiveSessionSummary]
    total: int
