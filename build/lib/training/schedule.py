"""Learning-rate schedules made of segments: e.g. a linear warm-up, then a cosine decay over the rest of the run.

A schedule is a pure function of (iteration, total iterations), so resuming a run needs no scheduler state and
extending a run re-plans the remaining segments over the new total. Text form, for the command line:
`linear:0.05:0.01-1,cosine:rest:1-0.01` = KIND:LENGTH:START-END segments, where KIND is linear, cosine or constant,
LENGTH is a number of iterations (an integer), a fraction of the run (a number below 1) or `rest`, and START/END
are multipliers of the base learning rate.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from registry.errors import LanternError, describe_validation_error

SegmentKind = Literal["linear", "cosine", "constant"]


class Segment(BaseModel):
    """One piece of the schedule: the LR multiplier goes from `start` to `end` over `length`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: SegmentKind
    length: int | float | Literal["rest"] = Field(
        description="iterations (int >= 1), a fraction of the run (0 < float < 1), or 'rest'")
    start: float = Field(1.0, ge=0)
    end: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _check_length(self) -> "Segment":
        if isinstance(self.length, bool):
            raise ValueError("length must be a number or 'rest'")
        if isinstance(self.length, int) and self.length < 1:
            raise ValueError(f"length in iterations must be >= 1, got {self.length}")
        if isinstance(self.length, float) and not 0 < self.length < 1:
            raise ValueError(f"a fractional length must be between 0 and 1, got {self.length}")
        return self

    def iterations(self, total: int) -> int | None:
        """This segment's length in iterations for a run of `total` (None for 'rest')."""
        if self.length == "rest":
            return None
        if isinstance(self.length, float):
            return max(1, round(self.length * total))
        return int(self.length)

    def factor(self, progress: float) -> float:
        """The multiplier at `progress` in [0, 1] through the segment."""
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            return self.start + (self.end - self.start) * progress
        return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * progress))


class LRSchedule(BaseModel):
    """Segments applied one after another; after the last one, its end value holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    segments: tuple[Segment, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_rest(self) -> "LRSchedule":
        rests = [i for i, s in enumerate(self.segments) if s.length == "rest"]
        if len(rests) > 1:
            raise ValueError("only one segment may have length 'rest'")
        return self

    def factor(self, iteration: int, total: int) -> float:
        """The LR multiplier for the update made at `iteration` (0-based) of a run of `total` iterations."""
        lengths = [s.iterations(total) for s in self.segments]
        fixed = sum(n for n in lengths if n is not None)
        lengths = [n if n is not None else max(total - fixed, 1) for n in lengths]
        position = 0
        for segment, length in zip(self.segments, lengths, strict=True):
            if iteration < position + length:
                return segment.factor((iteration - position) / max(length - 1, 1))
            position += length
        return self.segments[-1].factor(1.0)

    def describe(self) -> str:
        """The schedule in its text form."""
        return ",".join(f"{s.kind}:{s.length}:{s.start:g}-{s.end:g}" for s in self.segments)


DEFAULT_SCHEDULE = LRSchedule(segments=(Segment(kind="linear", length=0.05, start=0.02, end=1.0),
                                        Segment(kind="cosine", length="rest", start=1.0, end=0.01)))


def _number(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_schedule(text: str) -> LRSchedule:
    """Parse the text form (see the module docstring); errors name the bad segment."""
    segments = []
    for item in (part.strip() for part in text.split(",")):
        fields = item.split(":")
        try:
            if len(fields) not in (2, 3):
                raise ValueError("expected KIND:LENGTH[:START-END]")
            kind, length_text = fields[0], fields[1]
            values = fields[2].split("-") if len(fields) == 3 else ["1", "1"]
            if len(values) == 1:
                values = values * 2
            if len(values) != 2:
                raise ValueError("expected START-END multipliers, e.g. 1-0.01")
            length = "rest" if length_text == "rest" else _number(length_text)
            segments.append(Segment(kind=kind, length=length, start=float(values[0]), end=float(values[1])))
        except ValidationError as error:
            raise LanternError(describe_validation_error(error, f"LR schedule segment {item!r}")) from None
        except ValueError as error:
            raise LanternError(f"LR schedule segment {item!r}: {error} "
                               "(e.g. linear:0.05:0.01-1,cosine:rest:1-0.01)") from None
    try:
        return LRSchedule(segments=tuple(segments))
    except ValidationError as error:
        raise LanternError(describe_validation_error(error, "LR schedule")) from None
