"""The end-to-end workloads, as data: what each step sends and how the ramp moves.

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
    messages_per_user: int = 1  # dump: preloaded rows per user; register: per pending user
    body_bytes: int = 100  # dump: size of each preloaded text/plain body
    # register: "first" (AoRs without a binding) or "refresh" (same Call-ID, higher CSeq)
    kind: str = ""
    pending_share: float = 0.0  # register: share of the users with stored messages
    prime_rate: int = 1000  # register refresh: REGISTER/s of the untimed first round

    @property
    def runner(self) -> str:
        """The step function's name in steps.RUNNERS (all register-* share one)."""
        return self.name.split("-", 1)[0]

    def rates(self) -> list[int]:
        """The offered rates of the ramp, lowest first."""
        return list(range(self.start_rate, self.max_rate + 1, self.step))


def _register(kind: str, mailboxes: str) -> Workload:
    first = kind == "first"
    what = (
        "first REGISTER of an AoR without a binding (new Call-ID, CSeq 1)"
        if first
        else "refresh of a registered binding (same Call-ID, CSeq + 1, same contact)"
    )
    boxes = (
        "empty mailboxes"
        if mailboxes == "empty"
        else "10 % of the users have a stored message, dumped to a sipp UAS"
    )
    return Workload(
        name=f"register-{kind}-{mailboxes}",
        description=f"{what}, {boxes}; 200 expected (503 counted); rate = REGISTER/s",
        start_rate=1000,
        step=1000,
        max_rate=16000,
        warmup=2.0,
        duration=10.0,
        # first: one fresh AoR per REGISTER of the step; refresh: the population refreshed
        # in rounds (the step's REGISTERs cycle over it).
        users=20_000,
        messages_per_user=1,
        kind=kind,
        pending_share=0.0 if mailboxes == "empty" else 0.1,
    )


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
    **{
        w.name: w
        for w in (
            _register("first", "empty"),
            _register("refresh", "empty"),
            _register("first", "pending"),
            _register("refresh", "pending"),
        )
    },
}
# "register" on the command line: all four, each its own ramp.
GROUPS = {"register": [n for n in WORKLOADS if n.startswith("register-")]}

# --quick: a smoke test of every moving part, a few seconds per step, a few steps.
QUICK: dict[str, dict[str, float | int]] = {
    "store": {"start_rate": 500, "step": 500, "max_rate": 1500, "warmup": 1.0, "duration": 4.0},
    "dump": {"start_rate": 200, "step": 300, "max_rate": 800, "warmup": 1.0, "duration": 4.0},
    **{
        name: {
            "start_rate": 500,
            "step": 500,
            "max_rate": 1000,
            "warmup": 1.0,
            "duration": 4.0,
            "users": 2000,
        }
        for name in GROUPS["register"]
    },
}


def expand(names: list[str]) -> list[str]:
    """Workload names with groups ("register") replaced by their members."""
    out: list[str] = []
    for name in names:
        for member in GROUPS.get(name, [name]):
            if member not in out:
                out.append(member)
    return out


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
        if not 0.0 <= workload.pending_share <= 1.0 or workload.users < 0:
            raise ValueError(f"{name}: pending share must be in [0, 1] and users >= 0")
        chosen.append(workload)
    return chosen
