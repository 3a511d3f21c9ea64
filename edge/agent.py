"""The running agent: wires sampler, pipeline, outbox, publisher and commands together.

The main thread owns time: it closes windows on their boundaries, writes
batches to the outbox (one transaction per flush), runs commands, sends the
heartbeat and pets the systemd watchdog. Poller threads only feed the
pipeline; the publisher thread only talks to the broker.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from millrace.edge.batching import SeqCounter, build_batches
from millrace.edge.commands import CommandProcessor
from millrace.edge.config import AgentConfig
from millrace.edge.drivers.mqtt import client_credentials
from millrace.edge.health import (
    CertClock,
    ClockState,
    HealthInputs,
    ResourceMeter,
    agent_version,
    birth_message,
    heartbeat_message,
)
from millrace.edge.outbox import Outbox, PreviousRun
from millrace.edge.pacing import publish_offset_s
from millrace.edge.pipeline import Pipeline
from millrace.edge.publisher import Publisher
from millrace.edge.sampler import Sampler
from millrace.edge.state import AgentState, StateStore
from millrace.edge.status import AgentStatus, StatusFile
from millrace.edge.systemd import Notifier
from millrace.errors import ConfigError, MillraceError
from millrace.topics import health_topic, reply_topic, state_topic
from millrace.wire import MAX_HOLE_METRICS
from millrace.wire.periods import period_problem

log = logging.getLogger(__name__)

# Longest sleep of the main loop; events and commands are handled at least this often.
MAIN_LOOP_MAX_WAIT_SECONDS = 0.5
# Change events wait at most this long for the next flush (one SD write per flush).
EVENT_FLUSH_DELAY_SECONDS = 1.0
OUTBOX_EXPIRE_INTERVAL_SECONDS = 60.0
# How long SIGTERM waits for the outbox to reach the broker before disconnecting.
FINAL_PUBLISH_SECONDS = 5.0
# The first heartbeat follows start-up quickly so a new device shows its health at once.
FIRST_HEARTBEAT_SECONDS = 2.0
# A publish loop that has not turned for this long is stuck (a hung disk, a wedged socket):
# the watchdog is no longer pinged and systemd restarts the agent. Its longest legitimate
# pause is a connect attempt (TCP, TLS and the CONNACK wait, about 20 s).
PUBLISHER_STALL_SECONDS = 45.0

_STOP = ("", b"")
LOCK_FILE = "agent.lock"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def check_files(config: AgentConfig) -> None:
    """Fail early, naming the key, when a file the agent needs is missing or unreadable."""
    needed: list[tuple[str, Path]] = [
        (f"broker.{key}", getattr(config.broker, key)) for key in ("ca", "cert", "key")
    ]
    for name, source in config.local_mqtt.items():
        for key in ("password_file", "ca", "cert", "key"):
            path = getattr(source, key)
            if path is not None:
                needed.append((f"local_mqtt.{name}.{key}", path))
    for key, path in needed:
        if not path.is_file():
            raise ConfigError(key, f"file not found: {path}", source=_src(config))
        if not os.access(path, os.R_OK):
            raise ConfigError(key, f"not readable: {path}", source=_src(config))
    for source in config.local_mqtt.values():
        client_credentials(source, config_file=_src(config))
    check_opcua_files(config)


def check_opcua_files(config: AgentConfig) -> None:
    """[opcua.<name>]: asyncua installed (the opcua extra), files readable, the key 0600."""
    if not config.opcua:
        return
    from millrace.edge.drivers.opcua import asyncua_missing, read_password

    for name, server in config.opcua.items():
        if problem := asyncua_missing():
            raise ConfigError(f"opcua.{name}", problem, source=_src(config))
        for key in ("cert", "key", "server_cert", "password_file"):
            path = getattr(server, key)
            if path is None:
                continue
            where = f"opcua.{name}.{key}"
            if not path.is_file():
                raise ConfigError(where, f"file not found: {path}", source=_src(config))
            if not os.access(path, os.R_OK):
                raise ConfigError(where, f"not readable: {path}", source=_src(config))
            mode = path.stat().st_mode & 0o777
            if key in ("key", "password_file") and mode & 0o077:
                raise ConfigError(
                    where,
                    f"{path} is mode {mode:o}, readable by others: chmod 600 {path}",
                    source=_src(config),
                )
        read_password(server, config_file=_src(config))


def _src(config: AgentConfig) -> str | None:
    return str(config.source) if config.source else None


def apply_saved_settings(config: AgentConfig, state: AgentState) -> AgentConfig:
    """The config with settings from earlier `set` commands, where still valid."""
    period = state.period_s
    if period is not None and period <= config.windows.grace_s:
        log.warning("ignoring saved period_s=%s: not longer than grace_s", period)
        period = None
    if period is not None and (problem := period_problem(period)):
        log.warning("ignoring saved period_s: %s", problem)
        period = None
    polls = {m: s for m, s in state.poll_s.items() if (sig := config.signal(m)) and sig.polled}
    return config.with_settings(period_s=period, poll_s=polls)


@dataclass(frozen=True, slots=True)
class UncleanEnd:
    """The hole a previous run left by ending without its orderly stop, as births report it."""

    prev_boot_id: str
    closed_ms: dict[str, int]  # metric -> end of its last closed window: the hole's start
    omitted: int  # metrics over MAX_HOLE_METRICS, or whose end is after this start


def unclean_end(previous: PreviousRun | None, started_ms: int) -> UncleanEnd | None:
    """The hole to report for `previous`, or None when it stopped cleanly (or never ran).

    Each metric's hole is [its last closed window end, started_ms). A metric whose end lies
    after this start (the clock went back across the restart) is counted, not named.
    """
    if previous is None or previous.clean:
        return None
    ends = sorted((m, e) for m, e in previous.closed_ms.items() if e <= started_ms)
    named = dict(ends[:MAX_HOLE_METRICS])
    return UncleanEnd(previous.boot_id, named, len(previous.closed_ms) - len(named))


def _take_lock(state_dir: Path) -> int:
    """Hold an exclusive lock so two agents never share (and double-send) one outbox."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MillraceError(
            f"another edge agent is running with state directory {state_dir}"
        ) from None
    return fd


class Agent:
    """One edge agent process."""

    def __init__(self, config: AgentConfig, *, notifier: Notifier | None = None) -> None:
        self._lock_fd = _take_lock(config.state_dir)
        self.store = StateStore(config.state_dir)
        state = self.store.load()
        self.config = apply_saved_settings(config, state)
        self.boot_id = uuid.uuid4().hex
        self.started = time.monotonic()
        self.started_ms = now_ms()
        self.exit_code = 0
        self.publisher_stall_s = PUBLISHER_STALL_SECONDS
        self.status_file = StatusFile(config.state_dir)
        self.notifier = notifier or Notifier()
        self.outbox = Outbox(
            config.outbox.path, max_bytes=config.outbox.max_bytes, max_age_s=config.outbox.max_age_s
        )
        # Recorded before sampling starts: from here on, an end without _shutdown is unclean.
        self.unclean_end = unclean_end(
            self.outbox.begin_run(self.boot_id, self.started_ms), self.started_ms
        )
        if self.unclean_end is not None:
            log.warning(
                "the previous run (boot_id=%s) ended uncleanly (power cut, kill or watchdog);"
                " its births report the hole of %d metric(s)",
                self.unclean_end.prev_boot_id,
                len(self.unclean_end.closed_ms) + self.unclean_end.omitted,
            )
        self.pipeline = Pipeline(
            self.config.signals,
            periods_s=self.config.windows.periods_s,
            grace_ms=int(self.config.windows.grace_s * 1000),
        )
        self.seqs = SeqCounter()
        self._inbox: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self.processor = CommandProcessor(
            config=self.config, store=self.store, state=state, control=self
        )
        self.publisher = Publisher(
            config=self.config,
            outbox=self.outbox,
            boot_id=self.boot_id,
            birth=self._birth_payload,
            on_command=self._on_command,
        )
        self.sampler = Sampler(self.config, self.pipeline)
        self.meter = ResourceMeter()
        self.cert_clock = CertClock(config.broker.cert)
        self.clock = ClockState()

    # ---------------------------------------------------------------- lifecycle

    def request_stop(self) -> None:
        self._stop.set()
        self._inbox.put(_STOP)

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("received %s; closing windows and stopping", signal.Signals(signum).name)
        self.request_stop()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or request_stop); return the exit code."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        pending = self.outbox.stats()
        log.info(
            "agent %s starting: boot_id=%s, %d signal(s), %d batch(es) waiting in the outbox",
            self.config.device_id,
            self.boot_id,
            len(self.config.signals),
            pending.batches,
        )
        self.write_status()
        self.sampler.start()
        self.publisher.start()
        self.notifier.ready(f"sampling {len(self.config.signals)} signal(s)")
        try:
            self._loop()
        finally:
            self._shutdown()
        return self.exit_code

    def write_status(self) -> None:
        """status.json: this process's milestones, for a rollout's health gate."""
        pub = self.publisher
        self.status_file.update(
            AgentStatus(
                pid=self.status_file.pid,
                boot_id=self.boot_id,
                started_ms=self.started_ms,
                connected_ms=pub.first_connected_ms,
                connected=pub.connected,
                receipted_ms=pub.first_own_receipt_ms,
                last_error=pub.last_error,
                broker=pub.broker,
            )
        )

    def _threads_dead(self) -> str:
        """What died among the worker threads ("" while all live)."""
        dead = [] if self.publisher.alive else ["publisher"]
        return ", ".join(dead + self.sampler.dead_threads())

    def _watchdog_ok(self, mono: float) -> bool:
        """The watchdog may be pinged: the publish loop made progress recently."""
        stalled_s = mono - self.publisher.beat
        if stalled_s <= self.publisher_stall_s:
            return True
        log.error("publisher stalled for %.0f s; not pinging the watchdog", stalled_s)
        return False

    def _loop(self) -> None:
        mono = time.monotonic()
        next_heartbeat = mono + min(FIRST_HEARTBEAT_SECONDS, self.config.heartbeat_s)
        next_expire = mono + OUTBOX_EXPIRE_INTERVAL_SECONDS
        watchdog_s = self.notifier.watchdog_interval_s
        next_watchdog = mono if watchdog_s else float("inf")
        event_deadline: float | None = None
        while not self._stop.is_set():
            try:
                event_deadline = self._tick(event_deadline)
            except Exception:  # a failing disk or a bug must not stop sampling
                log.exception("agent main loop error")
                event_deadline = None
            dead = self._threads_dead()
            if dead:
                # Sampling or sending has stopped for good: exit non-zero, systemd restarts us.
                log.error("thread(s) died: %s; exiting so the agent is restarted", dead)
                self.exit_code = 1
                break
            self._guarded(self.write_status)
            mono = time.monotonic()
            if mono >= next_heartbeat:
                next_heartbeat = mono + self.config.heartbeat_s
                self._guarded(self.send_heartbeat)
            if mono >= next_expire:
                next_expire = mono + OUTBOX_EXPIRE_INTERVAL_SECONDS
                self._guarded(self.outbox.expire)
            if watchdog_s and mono >= next_watchdog:
                if self._watchdog_ok(mono):
                    self.notifier.watchdog()
                next_watchdog = mono + watchdog_s
            wait_s = min(
                MAIN_LOOP_MAX_WAIT_SECONDS,
                max(0.0, (self._next_flush_ms(now_ms()) - now_ms()) / 1000),
                next_heartbeat - mono,
                next_watchdog - mono,
            )
            self._wait_for_commands(max(0.001, wait_s))

    @staticmethod
    def _guarded(job: Any) -> None:
        try:
            job()
        except Exception:
            log.exception("agent job %r failed", job)

    def _tick(self, event_deadline: float | None) -> float | None:
        """Flush what is due; return the deadline for pending events."""
        mono = time.monotonic()
        wall_ms = now_ms()
        if wall_ms >= self._next_flush_ms(wall_ms) or (
            event_deadline is not None and mono >= event_deadline
        ):
            event_deadline = None
            self.flush_to_outbox()
        if event_deadline is None and self.pipeline.pending_events:
            event_deadline = mono + EVENT_FLUSH_DELAY_SECONDS
        return event_deadline

    def _next_flush_ms(self, wall_ms: int) -> int:
        period_ms = self.config.windows.period_s * 1000
        grace_ms = int(self.config.windows.grace_s * 1000)
        # The next main-period boundary (plus grace) flushes even when no window is open,
        # so rejected counts of failing event signals still leave the device.
        base = wall_ms - grace_ms
        tick = base - base % period_ms + period_ms + grace_ms
        close = self.pipeline.next_close_ms()
        return tick if close is None else min(tick, close)

    def _wait_for_commands(self, timeout_s: float) -> None:
        try:
            item = self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            return
        while item is not _STOP:
            self._guarded(functools.partial(self._handle_command, *item))
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _shutdown(self) -> None:
        self.notifier.stopping()
        self.sampler.stop()
        written = self.flush_to_outbox(close_all=True)
        log.info("closed open windows into %d batch(es); final publish", written)
        self.publisher.shutdown(timeout_s=FINAL_PUBLISH_SECONDS)
        left = self.outbox.stats()
        self.outbox.mark_clean_stop()  # the windows are in the outbox: no hole to report
        self.outbox.close()
        self.notifier.close()
        self.release()
        log.info("stopped; %d batch(es) remain in the outbox for the next start", left.batches)

    def release(self) -> None:
        """Let another agent use this state directory (after stop)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # ---------------------------------------------------------------- work

    def flush_to_outbox(self, *, close_all: bool = False, wall_ms: int | None = None) -> int:
        """Encode what is due (all open windows if `close_all`) into the outbox; return batches.

        `wall_ms` replaces the clock (the benchmark replays synthetic time).
        """
        wall_ms = now_ms() if wall_ms is None else wall_ms
        drained = self.pipeline.drain(wall_ms, close_all=close_all)
        if not drained:
            return 0
        batches = build_batches(
            device=self.config.device_id,
            boot_id=self.boot_id,
            seqs=self.seqs,
            sent_at_ms=wall_ms,
            windows=drained.windows,
            events=drained.events,
            rejected=self.pipeline.rejected_total,
            dropped=self.outbox.dropped_total,
            clock_synced=self.clock.synced(),
            encoding=self.config.broker.encoding,
        )
        closed: dict[str, int] = {}
        for w in drained.windows:
            end_ms = w.start_ms + w.period_s * 1000
            if end_ms > closed.get(w.metric, -1):
                closed[w.metric] = end_ms
        if not close_all:  # at a stop the batches go at once: the final publish is short
            offset = publish_offset_s(self.config.device_id, self.config.windows.spread_s)
            self.publisher.hold_live(offset)
        # Written at close whatever the offset: only the send waits, never durability.
        self.outbox.append(
            self.boot_id, batches, encoding=self.config.broker.encoding, closed_ms=closed
        )
        self.publisher.wake()
        return len(batches)

    def health_inputs(self) -> HealthInputs:
        stats = self.outbox.stats()
        errors = self.pipeline.error_counts()
        errors.update(self.sampler.source_errors())
        return HealthInputs(
            outbox_batches=stats.batches,
            outbox_bytes=stats.bytes,
            outbox_oldest_age_s=stats.oldest_age_s,
            dropped_batches=stats.dropped_total,
            rejected_readings=self.pipeline.rejected_total,
            driver_errors=errors,
        )

    def send_heartbeat(self) -> bool:
        message = heartbeat_message(
            device=self.config.device_id,
            boot_id=self.boot_id,
            now_ms=now_ms(),
            inputs=self.health_inputs(),
            meter=self.meter,
            cert=self.cert_clock,
            clock=self.clock,
            disk_path=self.config.outbox.path.parent,
        )
        return self.publisher.publish_message(
            health_topic(self.config.device_id), message.to_json()
        )

    def _birth_payload(self) -> bytes:
        hole = self.unclean_end
        return birth_message(
            device=self.config.device_id,
            boot_id=self.boot_id,
            config_hash=self.config.config_hash,
            now_ms=now_ms(),
            units={s.metric: s.unit for s in self.config.signals if s.unit},
            started_ms=self.started_ms,
            prev_boot_id=hole.prev_boot_id if hole else "",
            prev_closed_ms=hole.closed_ms if hole else None,
            prev_metrics_omitted=hole.omitted if hole else 0,
        ).to_json()

    # ---------------------------------------------------------------- commands

    def _on_command(self, name: str, payload: bytes) -> None:
        """Called on paho's thread: hand over to the main loop."""
        self._inbox.put((name, payload))

    def _handle_command(self, name: str, payload: bytes) -> None:
        reply = self.processor.handle(name, payload)
        self.publisher.publish_message(reply_topic(self.config.device_id, name), reply.to_json())

    def set_period(self, period_s: int) -> None:
        windows = replace(self.config.windows, period_s=period_s)
        self.config = replace(self.config, windows=windows)
        self.pipeline.set_periods(windows.periods_s)
        log.info("window period set to %d s", period_s)

    def set_poll(self, metric: str, poll_s: float) -> None:
        self.config = self.config.with_settings(poll_s={metric: poll_s})
        self.sampler.reconfigure(self.config)
        log.info("poll interval of %s set to %g s", metric, poll_s)

    def flush(self) -> dict[str, Any]:
        written = self.flush_to_outbox()
        self.publisher.flush()
        return {"batches_written": written}

    def rebirth(self) -> None:
        self.publisher.publish_message(
            state_topic(self.config.device_id), self._birth_payload(), retain=True
        )

    def status(self) -> dict[str, Any]:
        stats = self.outbox.stats()
        return {
            "device": self.config.device_id,
            "boot_id": self.boot_id,
            "agent_version": agent_version(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "outbox_batches": stats.batches,
            "dropped_batches": stats.dropped_total,
        }
