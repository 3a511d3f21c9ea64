"""Commands from the cloud: ping, set, flush, rebirth; idempotent by command id.

A command's effect and the record of its id are persisted together before it
is applied, and the reply is remembered: a repeated id gets the same reply
again (flagged `duplicate`) without being applied a second time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from millrace.edge.config import MAX_POLL_SECONDS, MIN_POLL_SECONDS, AgentConfig
from millrace.edge.state import AgentState, StateStore
from millrace.errors import WireError
from millrace.wire import Command, CommandReply
from millrace.wire.batch import MAX_PERIOD_SECONDS
from millrace.wire.periods import period_problem

log = logging.getLogger(__name__)

COMMAND_NAMES = ("ping", "set", "flush", "rebirth")


class AgentControl(Protocol):
    """What commands may do to a running agent."""

    def set_period(self, period_s: int) -> None: ...

    def set_poll(self, metric: str, poll_s: float) -> None: ...

    def flush(self) -> dict[str, Any]: ...

    def rebirth(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class CommandError(Exception):
    """A command that cannot be applied as asked; the message goes into the reply."""


def _number(args: dict[str, Any], key: str) -> float:
    value = args[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CommandError(f"{key}: expected a number, got {value!r}")
    return float(value)


class CommandProcessor:
    """Validates, persists, applies and answers commands."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        store: StateStore,
        state: AgentState,
        control: AgentControl,
    ) -> None:
        self.config = config
        self.store = store
        self.state = state
        self.control = control
        self._handlers: dict[str, Callable[[dict[str, Any]], tuple[dict[str, Any], AgentState]]] = {
            "ping": self._ping,
            "set": self._set,
            "flush": self._flush,
            "rebirth": self._rebirth,
        }

    def handle(self, name: str, payload: bytes) -> CommandReply:
        """Answer one command received on the cmd topic `name`."""
        try:
            command = Command.from_json(payload)
        except WireError as exc:
            return CommandReply(id="", ok=False, error=f"malformed command: {exc.reason}")
        if command.name != name:
            return CommandReply(
                id=command.id,
                ok=False,
                error=f"command name {command.name!r} does not match topic {name!r}",
            )
        seen = self.state.commands.get(command.id)
        if seen is not None:
            log.info("command %s (%s) repeated; answering again", command.id, name)
            return replace(CommandReply.from_json(seen[1].encode()), duplicate=True)
        handler = self._handlers.get(name)
        if handler is None:
            reply = CommandReply(
                id=command.id, ok=False, error=f"unknown command {name!r}; try {COMMAND_NAMES}"
            )
            return reply
        try:
            result, new_state = handler(command.args)
        except CommandError as exc:
            reply = CommandReply(id=command.id, ok=False, error=str(exc))
            new_state = self.state
            apply = False
        else:
            reply = CommandReply(id=command.id, ok=True, result=result)
            apply = True
        new_state = new_state.remember(command.id, name, reply.to_json().decode())
        try:
            self.store.save(new_state)
        except OSError as exc:
            log.error("cannot persist command %s: %s", command.id, exc)
            return CommandReply(id=command.id, ok=False, error=f"cannot persist state: {exc}")
        previous, self.state = self.state, new_state
        if apply:
            self._apply(name, command.args, previous)
        log.info("command %s %s applied: ok=%s", command.id, name, reply.ok)
        return reply

    def _apply(self, name: str, args: dict[str, Any], previous: AgentState) -> None:
        if name == "set":
            if "period_s" in args and self.state.period_s != previous.period_s:
                self.control.set_period(int(args["period_s"]))
            if "metric" in args:
                self.control.set_poll(str(args["metric"]), float(args["poll_s"]))
        elif name == "flush":
            self.control.flush()
        elif name == "rebirth":
            self.control.rebirth()

    def _ping(self, args: dict[str, Any]) -> tuple[dict[str, Any], AgentState]:
        return {"pong": True, **self.control.status()}, self.state

    def _flush(self, args: dict[str, Any]) -> tuple[dict[str, Any], AgentState]:
        return {"flushed": True}, self.state

    def _rebirth(self, args: dict[str, Any]) -> tuple[dict[str, Any], AgentState]:
        return {"rebirth": True}, self.state

    def _set(self, args: dict[str, Any]) -> tuple[dict[str, Any], AgentState]:
        allowed = {"period_s", "metric", "poll_s"}
        unknown = sorted(set(args) - allowed)
        if unknown:
            raise CommandError(f"unknown argument(s) {unknown}; set takes period_s, metric, poll_s")
        if not args:
            raise CommandError("nothing to set: give period_s, or metric and poll_s")
        state = self.state
        result: dict[str, Any] = {}
        if "period_s" in args:
            period = args["period_s"]
            if isinstance(period, float) and period.is_integer():
                period = int(period)
            if type(period) is not int or not 1 <= period <= MAX_PERIOD_SECONDS:
                raise CommandError(f"period_s: expected an integer in [1, {MAX_PERIOD_SECONDS}]")
            if problem := period_problem(period):
                raise CommandError(f"period_s: {problem}")
            grace = self.config.windows.grace_s
            if period <= grace:
                raise CommandError(f"period_s: must be longer than grace_s ({grace:g})")
            state = replace(state, period_s=period)
            result["period_s"] = period
        if ("metric" in args) != ("poll_s" in args):
            raise CommandError("metric and poll_s go together")
        if "metric" in args:
            metric = args["metric"]
            signal = self.config.signal(metric) if isinstance(metric, str) else None
            if signal is None:
                raise CommandError(f"metric: no signal publishes {metric!r}")
            if signal.driver == "opcua":
                raise CommandError(
                    f"metric: {metric!r} is read on its OPC UA session's own schedule;"
                    " change its poll_s in the config"
                )
            if not signal.polled:
                raise CommandError(f"metric: {metric!r} is pushed by its source, not polled")
            poll = _number(args, "poll_s")
            if not MIN_POLL_SECONDS <= poll <= MAX_POLL_SECONDS:
                raise CommandError(f"poll_s: outside [{MIN_POLL_SECONDS}, {MAX_POLL_SECONDS:g}]")
            state = replace(state, poll_s={**state.poll_s, metric: poll})
            result.update(metric=metric, poll_s=poll)
        return result, state
