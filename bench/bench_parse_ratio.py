"""sippy / C and twin / C on the typical MESSAGE and REGISTER, timed in alternating rounds.

This VM switches between a fast and a slow state every few seconds (the C parse takes
1.6 or 3.2 µs, sippy 62 or 120 µs), so pytest-benchmark, which times one function after
the other, can compare C in one state with sippy in the other and report anything from
20× to 80×.  Here every round times C, then the other parser, then C again, each for a
few milliseconds; the round's ratio compares neighbours in time, and the median over the
rounds is the result.

    python bench/bench_parse_ratio.py            # 200 rounds, both workloads
    python bench/bench_parse_ratio.py --rounds 500 --json out.json

The hot path of a stored MESSAGE -- parse, ``normalize_aor`` of the To URI, build the
202 -- is timed the same way, next to the C parse alone, so its cost can be read in the
machine's fast state (the rounds' minimum) as well as in the median.

Exit status 1 when the MESSAGE ratio sippy/C is below ``--target`` (30, the issue's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_parse import EXPECTED, IMPLS, MESSAGE, WORKLOADS

from msilo.sip import parser as selector
from msilo.sip.build import build_response

Work = Callable[[bytes], tuple[Any, ...]]


def _per_call(func: Work, data: bytes, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        func(data)
    return (time.perf_counter() - start) / calls


def _calls_for(func: Work, data: bytes, seconds: float) -> int:
    """How many calls take about ``seconds``."""
    return max(1, int(seconds / max(_per_call(func, data, 20), 1e-9)))


def ratios(workload: str, other: str, rounds: int) -> dict[str, float]:
    """Median per-call times of C and ``other`` and the median of the rounds' ratios."""
    data = WORKLOADS[workload]
    c, o = IMPLS["c"], IMPLS[other]
    assert c(data) == o(data) == EXPECTED[workload]  # both really parse the same fields
    n_c, n_o = _calls_for(c, data, 0.004), _calls_for(o, data, 0.004)
    times_c: list[float] = []
    times_o: list[float] = []
    per_round: list[float] = []
    for _ in range(rounds):
        before = _per_call(c, data, n_c)
        theirs = _per_call(o, data, n_o)
        after = _per_call(c, data, n_c)
        ours = (before + after) / 2
        times_c.append(ours)
        times_o.append(theirs)
        per_round.append(theirs / ours)
    return {
        "c_us": statistics.median(times_c) * 1e6,
        f"{other}_us": statistics.median(times_o) * 1e6,
        "ratio": statistics.median(per_round),
        "ratio_p10": statistics.quantiles(per_round, n=10)[0],
    }


def hot_path(rounds: int) -> dict[str, float]:
    """Parse + normalize_aor(To) + build the 202, per call: median and fastest round."""
    parse, normalize = selector.parse_message_c, selector.normalize_aor_c

    def run(data: bytes) -> tuple[Any, ...]:
        request: Any = parse(data)
        return (normalize(request.to.uri), build_response(request, 202, "Accepted"))

    aor, response = run(MESSAGE)
    assert aor == "bob@example.com" and response.startswith(b"SIP/2.0 202 Accepted")
    calls = _calls_for(run, MESSAGE, 0.004)
    times = [_per_call(run, MESSAGE, calls) for _ in range(rounds)]
    return {"median_us": statistics.median(times) * 1e6, "min_us": min(times) * 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--target", type=float, default=30.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if "c" not in IMPLS:
        print("msilo._fastparse is not built: pip install -e . first", file=sys.stderr)
        return 2
    result: dict[str, dict[str, float]] = {}
    for workload in sorted(WORKLOADS):
        for other in ("sippy", "py"):
            r = ratios(workload, other, args.rounds)
            result[f"{workload} {other}/C"] = r
            print(
                f"{workload:8} {other:5}/C: C {r['c_us']:.2f} µs, {other} "
                f"{r[f'{other}_us']:.1f} µs, ratio median {r['ratio']:.1f}x "
                f"(10th percentile {r['ratio_p10']:.1f}x)"
            )
    hot = hot_path(args.rounds)
    result["MESSAGE parse + AoR + 202"] = hot
    print(
        f"MESSAGE parse + normalize_aor + build 202: median {hot['median_us']:.2f} µs, "
        f"fastest round {hot['min_us']:.2f} µs"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["MESSAGE sippy/C"]["ratio"] >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
