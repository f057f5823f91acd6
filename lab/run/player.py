"""The chaos player: a scenario's steps applied to a running lab on their schedule."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from lab.run.backends import Backend
from lab.run.chaos import Scenario
from lab.run.control import apply_step, step_entry


class ChaosPlayer:
    """Plays a scenario's steps against the backend while the driver runs, from the driver's
    start; every step's outcome (or error) is recorded with its planned and actual time."""

    def __init__(self, scenario: Scenario, be: Backend, say: Callable[[str], None]) -> None:
        self.scenario = scenario
        self.be = be
        self.say = say
        self.started = threading.Event()
        self.stop = threading.Event()
        self.started_at = 0.0
        self.log: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def start_clock(self, started_at: float) -> None:
        self.started_at = started_at
        self.started.set()

    def _run(self) -> None:
        while not self.started.wait(0.1):
            if self.stop.is_set():
                return
        for step in self.scenario.steps:
            delay = self.started_at + step.at_s - time.time()
            if delay > 0 and self.stop.wait(delay):
                return
            entry: dict[str, Any] = {
                "at_s": step.at_s,
                "t": round(time.time() - self.started_at, 3),
                **step_entry(step),
            }
            try:
                entry["result"] = apply_step(self.be, step)
            except Exception as exc:  # recorded and reported; the run goes on
                entry["error"] = f"{type(exc).__name__}: {exc}"
            self.log.append(entry)
            self.say(f"[chaos] t={entry['t']:.1f}s {entry.get('result') or entry.get('error')}")
