"""The two end-to-end workloads, as data: what each step sends and how the ramp moves.

A step runs ``warmup + duration`` seconds at one offered rate; latencies and the achieved
rate are taken from the ``duration`` window only, while failures and retransmissions count
over the whole step (a warm-up that already fails is a failed step).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """One workload; rates are in the workload's unit (MESSAGEs/s stored or delivered)."""

    name: str
    description: str
    start_rate: int
    step: int
    max_rate: int
    warmup: float  # seconds at the step's rate before the measuring window
    duration: float  # seconds of the measuring window (>= 20 in a full run)
    users: int  # store: distinct offline users cycled through; dump: 0 = sized by the step
    messages_per_user: int = 1  # dump: preloaded rows per user
    body_bytes: int = 100  # dump: size of each preloaded text/plain body

    def rates(self) -> list[int]:
        """The offered rates of the ramp, lowest first."""
        return list(range(self.start_rate, self.max_rate + 1, self.step))


WORKLOADS: dict[str, Workload] = {
    "store": Workload(
        name="store",
        description=(
            "MESSAGE (~100-byte text/plain) to an offline user, 202 expected; rate = MESSAGE/s"
        ),
        start_rate=1000,
        step=500,
        max_rate=20000,  # msilo held 14,500/s on a quiet 2-vCPU VM
        warmup=5.0,
        duration=20.0,
        users=10_000,
    ),
    "dump": Workload(
        name="dump",
        description=(
            "REGISTER of a user with 10 stored messages, each delivered to a sipp UAS that "
            "answers 200; rate = messages delivered/s (REGISTER/s = rate / 10)"
        ),
        start_rate=500,
        step=500,
        max_rate=10000,
        warmup=2.0,
        duration=20.0,
        users=0,
        messages_per_user=10,
    ),
}

# --quick: a smoke test of every moving part, a few seconds per step, a few steps.
QUICK: dict[str, dict[str, float | int]] = {
    "store": {"start_rate": 500, "step": 500, "max_rate": 1500, "warmup": 1.0, "duration": 4.0},
    "dump": {"start_rate": 200, "step": 300, "max_rate": 800, "warmup": 1.0, "duration": 4.0},
}


def select(names: list[str], *, quick: bool, overrides: dict[str, float | int]) -> list[Workload]:
    """The workloads to run, with --quick values then command-line overrides applied."""
    chosen = []
    for name in names:
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r} (known: {', '.join(WORKLOADS)})")
        workload = WORKLOADS[name]
        if quick:
            workload = dataclasses.replace(workload, **QUICK[name])  # type: ignore[arg-type]
        given = {k: v for k, v in overrides.items() if v is not None}
        workload = dataclasses.replace(workload, **given)  # type: ignore[arg-type]
        if workload.duration <= 0 or workload.step <= 0 or workload.start_rate <= 0:
            raise ValueError(f"{name}: duration, step and start rate must be > 0")
        chosen.append(workload)
    return chosen
