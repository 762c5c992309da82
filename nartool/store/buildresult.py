"""What a build came to (Nix's ``BuildResult``, a libstore type): the status and the result
record that the scheduler (:mod:`nartool.build`) returns and the serve protocol
(:mod:`nartool.remote`) carries.

Declared here, below both of them: the build layer needs no part of the remote one for its
results. How a result goes on the wire is declared with the other messages, in
:mod:`nartool.remote.messages` (:func:`~nartool.remote.messages.write_build_result`,
:func:`~nartool.remote.messages.read_build_result`).
"""

from __future__ import annotations

import enum

from .._record import Frozen


class BuildStatus(enum.IntEnum):
    """``BuildResult.status`` values (Nix's ``BuildResult::Status``)."""

    BUILT = 0
    SUBSTITUTED = 1
    ALREADY_VALID = 2
    PERMANENT_FAILURE = 3
    INPUT_REJECTED = 4
    OUTPUT_REJECTED = 5
    TRANSIENT_FAILURE = 6
    CACHED_FAILURE = 7
    TIMED_OUT = 8
    MISC_FAILURE = 9
    DEPENDENCY_FAILED = 10
    LOG_LIMIT_EXCEEDED = 11
    NOT_DETERMINISTIC = 12
    RESOLVES_TO_ALREADY_VALID = 13
    NO_SUBSTITUTERS = 14


class BuildResult(Frozen):
    """A build's outcome: ``status`` (a :class:`BuildStatus` value) and ``error_msg``; how many
    times it was built, whether the builds differed, when it started and stopped (seconds
    since the epoch), and the built outputs (output id and realisation as JSON text).

    Immutable, compared and hashed by value, with :meth:`~nartool._record.Record.replace`."""

    __slots__ = ("status", "error_msg", "times_built", "is_non_deterministic", "start_time", "stop_time",
                 "built_outputs")

    status: int
    error_msg: str
    times_built: int
    is_non_deterministic: bool
    start_time: int
    stop_time: int
    built_outputs: tuple[tuple[str, str], ...]

    def __init__(self, status: int, error_msg: str = "", times_built: int = 0, is_non_deterministic: bool = False,
                 start_time: int = 0, stop_time: int = 0, built_outputs: tuple[tuple[str, str], ...] = ()) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "status", status)
        setattr_(self, "error_msg", error_msg)
        setattr_(self, "times_built", times_built)
        setattr_(self, "is_non_deterministic", is_non_deterministic)
        setattr_(self, "start_time", start_time)
        setattr_(self, "stop_time", stop_time)
        setattr_(self, "built_outputs", built_outputs)


__all__ = ["BuildResult", "BuildStatus"]
