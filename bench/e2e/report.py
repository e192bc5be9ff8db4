"""Machine info, the tables, the JSON file and the rate-vs-latency plot."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg

from bench.e2e.servers import run_pg


def machine_info(admin_dsn: str) -> dict[str, Any]:
    """What the numbers depend on: CPU, memory, load, tool and server versions, PG settings."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])

    async def pg(conn: asyncpg.Connection) -> dict[str, str]:
        out = {"version": str(await conn.fetchval("SHOW server_version"))}
        for name in ("fsync", "synchronous_commit", "shared_buffers", "max_connections"):
            out[name] = str(await conn.fetchval(f"SHOW {name}"))
        return out

    sipp = subprocess.run(["sipp", "-v"], capture_output=True, text=True, timeout=10).stdout
    versions: dict[str, str | None] = {}
    for package in ("asyncpg", "uvloop", "matplotlib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_mb": mem_kb // 1024,
        "load_average_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "sipp": next((ln.strip() for ln in sipp.splitlines() if "SIPp" in ln), sipp.strip()),
        "postgresql": run_pg(admin_dsn, pg),
        "packages": versions,
    }


def _ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


STEP_HEADER = (
    "| server | workload | rate/s | achieved/s | p50 ms | p90 ms | p99 ms | p99.9 ms "
    "| failed | retrans | rows | result |"
)


def step_row(step: dict[str, Any]) -> str:
    """One Markdown table row for a step."""
    lat = step["latency_ms"]
    rows = step["rows"]
    if step["workload"] == "store":
        rows_text = store_cell(step)
    elif step["workload"].startswith("register"):
        rows_text = register_cell(step)
    else:
        rows_text = f"{step['delivered']}/{step['preloaded']} left {rows}"
    result = "ok" if step["passed"] else "FAIL: " + "; ".join(step["reasons"])
    if step.get("overload"):
        result = f"overload {step.get('factor', 0):g}x: " + result
    elif step.get("recovery"):
        result = f"recovery after {step['after_factor']:g}x: " + result
    return (
        f"| {step['server']} | {step['workload']} | {step['rate']} | {step['achieved_rate']:.0f} "
        f"| {_ms(lat['p50'])} | {_ms(lat['p90'])} | {_ms(lat['p99'])} | {_ms(lat['p99.9'])} "
        f"| {step['failed']} | {step['retransmissions']} | {rows_text} | {result} |"
    )


def _pct(share: float) -> str:
    """A share in percent; never rounded to "100" or "0" unless it is exactly that."""
    value = share * 100.0
    if value == 0 or value == 100:
        return f"{value:.0f}"
    for digits in (1, 2, 3):
        text = f"{value:.{digits}f}"
        if float(text) not in (0.0, 100.0):
            return text
    return f"{value:.4f}"


def store_cell(step: dict[str, Any]) -> str:
    """Rows / 202s; with 503s their share; for an overload step the goodput and the 503
    latency, for a recovery step the seconds until the server was back to normal."""
    text = f"{step['rows']}/{step.get('rows_expected', step['successful'])}"
    shed = step.get("answered_503", 0)
    if step.get("overload"):
        lat = step["latency_ms_503"]
        text += f"; goodput {_pct(step['goodput_share'])}% of {step['best_rate']}/s; " + (
            f"503 {_pct(step['shares']['503'])}% in {_ms(lat['p50'])} / {_ms(lat['p99'])} ms"
            if shed
            else "no 503"
        )
    elif step.get("recovery"):
        after = step["recovery_s"]
        text += (
            f"; normal {after:g} s after the overload"
            if after is not None
            else f"; not normal within {step['duration_s']:g} s"
        )
        if shed:
            text += f"; 503 {_pct(step['shares']['503'])}%"
    elif shed:
        text += f"; 503 {_pct(step['shares']['503'])}%"
    return text


def register_cell(step: dict[str, Any]) -> str:
    """The shares of the step's REGISTERs answered 200 / 503 / failed (neither) and
    retransmitted (sipp's count over REGISTERs sent), then the delivered messages."""
    sh = step["shares"]
    text = (
        f"200 {_pct(sh['200'])}% / 503 {_pct(sh['503'])}% / failed {_pct(sh['failed'])}% "
        f"/ rtx {_pct(sh['retransmissions'])}%"
    )
    if step["preloaded"]:
        text += f"; msgs {step['delivered']}/{step['preloaded']} left {step['rows']}"
    if step.get("host_idle_share") is not None:
        text += f"; host idle {step['host_idle_share'] * 100:.0f}%"
    return text


def best(steps: list[dict[str, Any]], server: str, workload: str) -> dict[str, Any] | None:
    """The highest-rate step of the ramp that passed, if any (overload and recovery steps
    are not part of the ramp)."""
    passed = [s for s in ramp_steps(steps, server, workload) if s["passed"]]
    return max(passed, key=lambda s: s["rate"]) if passed else None


def ramp_steps(steps: list[dict[str, Any]], server: str, workload: str) -> list[dict[str, Any]]:
    """The ramp's own steps of ``server`` and ``workload``, in the order they ran."""
    return [
        s
        for s in steps
        if s["server"] == server
        and s["workload"] == workload
        and not s.get("overload")
        and not s.get("recovery")
    ]


def overload_rows(steps: list[dict[str, Any]], server: str, workload: str) -> list[dict[str, Any]]:
    """Per overload step: the offered rate, the goodput (200/202 per second) as a share of
    the best passing rate, the 503 latency, failures, and (store) the recovery after it."""
    top = best(steps, server, workload)
    ours = [s for s in steps if s["server"] == server and s["workload"] == workload]
    out = []
    for i, s in enumerate(ours):
        if not s.get("overload"):
            continue
        after = ours[i + 1] if i + 1 < len(ours) and ours[i + 1].get("recovery") else None
        goodput = s.get("goodput_rate", s["achieved_rate"])
        out.append(
            {
                "factor": s.get("factor"),
                "rate": s["rate"],
                "best_rate": top["rate"] if top else None,
                "goodput_rate": goodput,
                "goodput_share": goodput / top["rate"] if top else None,
                "share_503": s.get("shares", {}).get("503"),
                "latency_ms_503": s.get("latency_ms_503"),
                "failed": s["failed"],
                "retransmissions": s["retransmissions"],
                "passed": s["passed"],
                "recovery_s": after["recovery_s"] if after else None,
                "recovery_passed": after["passed"] if after else None,
            }
        )
    return out


def summary(
    steps: list[dict[str, Any]], servers: list[str], workloads: list[str]
) -> dict[str, Any]:
    """Per workload: each server's highest passing rate and its latencies, and the ratio."""
    out: dict[str, Any] = {}
    for workload in workloads:
        entry: dict[str, Any] = {}
        for server in servers:
            top = best(steps, server, workload)
            tried = [s["rate"] for s in ramp_steps(steps, server, workload)]
            if not tried:
                continue
            entry[server] = {
                "max_rate": top["rate"] if top else 0,
                "latency_ms": top["latency_ms"] if top else None,
                # Hitting the top of the ramp means the limit was not found.
                "ramp_exhausted": top is not None and top["rate"] == max(tried, default=0),
            }
            overloads = overload_rows(steps, server, workload)
            if overloads:
                entry[server]["overload"] = overloads
        for other in servers:
            if other == "msilo" or "msilo" not in entry or other not in entry:
                continue
            k_rate = entry[other]["max_rate"]
            m_rate = entry["msilo"]["max_rate"]
            suffix = other.replace("-", "_")
            entry[f"ratio_msilo_{suffix}"] = m_rate / k_rate if k_rate else None
            # The store criterion: msilo's p99 at Kamailio's highest rate.
            same = [
                s
                for s in steps
                if s["server"] == "msilo"
                and s["workload"] == workload
                and s["rate"] == k_rate
                and "latency_ms" in s
            ]
            entry[f"msilo_p99_at_{suffix}_max_ms"] = same[0]["latency_ms"]["p99"] if same else None
        out[workload] = entry
    return out


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The both-servers table with ratios."""
    servers = result["servers"]
    others = [s for s in servers if s != "msilo"] if "msilo" in servers else []
    lines = [
        "| workload | "
        + " | ".join(f"{s} max rate/s | {s} p50 / p99 ms" for s in servers)
        + "".join(f" | msilo / {o}" for o in others)
        + " |",
        "| --- | "
        + " | ".join("---: | ---:" for _ in servers)
        + "".join(" | ---:" for _ in others)
        + " |",
    ]
    for workload, entry in result["summary"].items():
        cells = []
        for server in servers:
            info = entry.get(server)
            if info is None:
                cells.append("- | -")
                continue
            lat = info["latency_ms"] or {}
            mark = "+" if info["ramp_exhausted"] else ""
            cells.append(
                f"{info['max_rate']}{mark} | {_ms(lat.get('p50'))} / {_ms(lat.get('p99'))}"
            )
        for other in others:
            ratio = entry.get(f"ratio_msilo_{other.replace('-', '_')}")
            cells.append(f"{ratio:.2f}x" if ratio else "-")
        lines.append(f"| {workload} | " + " | ".join(cells) + " |")
    over = [
        (workload, server, row)
        for workload, entry in result["summary"].items()
        for server in servers
        for row in (entry.get(server) or {}).get("overload", [])
    ]
    if over:
        lines += [
            "",
            "| overload | server | offered/s | goodput/s | of best | 503 | 503 p50 / p99 ms "
            "| failed | retrans | normal again after | goals |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for workload, server, row in over:
            lat = row["latency_ms_503"] or {}
            share = row["goodput_share"]
            share_503 = row["share_503"]
            rec = row["recovery_s"]
            if row["recovery_passed"] is None:
                rec_text, goals = "-", "ok" if row["passed"] else "missed"
            else:
                rec_text = f"{rec:g} s" if rec is not None else "not in the step"
                goals = "ok" if row["passed"] and row["recovery_passed"] else "missed"
            lines.append(
                f"| {workload} {row['factor']:g}x of {row['best_rate']} | {server} | {row['rate']} "
                f"| {row['goodput_rate']:.0f} | {_pct(share) + '%' if share is not None else '-'} "
                f"| {_pct(share_503) + '%' if share_503 is not None else '-'} "
                f"| {_ms(lat.get('p50'))} / {_ms(lat.get('p99'))} | {row['failed']} "
                f"| {row['retransmissions']} | {rec_text} | {goals} |"
            )
    return lines


def write_json(result: dict[str, Any], path: Path) -> None:
    def clean(value: Any) -> Any:
        # JSON has no NaN; an empty latency sample becomes null.
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(result), indent=2) + "\n")


def plot(result: dict[str, Any], path: Path) -> None:
    """Offered rate vs p50 (dashed) and p99 (solid) latency, one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(result["summary"])
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.5), squeeze=False)
    colours = {
        "msilo": "tab:blue",
        "kamailio": "tab:red",
        "kamailio-db1": "tab:orange",
        "msilo-wb": "tab:cyan",
    }
    for ax, workload in zip(axes[0], workloads, strict=True):
        for server in result["servers"]:
            steps = [
                s
                for s in result["steps"]
                if s["server"] == server
                and s["workload"] == workload
                and "latency_ms" in s
                and not s.get("recovery")  # at the best rate again: would draw a line back
            ]
            if not steps:
                continue
            colour = colours.get(server)
            rates = [s["rate"] for s in steps]
            for pct, style in (("p50", "--"), ("p99", "-")):
                values = [s["latency_ms"][pct] for s in steps]
                ax.plot(rates, values, style, marker="o", color=colour, label=f"{server} {pct}")
            failed = [s for s in steps if not s["passed"]]
            if failed:
                ax.scatter(
                    [s["rate"] for s in failed],
                    [s["latency_ms"]["p99"] for s in failed],
                    marker="x",
                    s=90,
                    color="black",
                    zorder=5,
                )
        unit = {"store": "MESSAGE/s stored", "dump": "messages/s delivered"}.get(
            workload, "REGISTER/s"
        )
        what = "MESSAGE → 202" if workload == "store" else "REGISTER → 200"
        ax.set_title(f"{workload}: {what} latency (x = failed step)")
        ax.set_xlabel(f"offered rate ({unit})")
        ax.set_ylabel("latency, ms")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    label = "SMOKE RUN (--quick)" if result["config"]["quick"] else "full run"
    fig.suptitle(f"msilo vs Kamailio msilo, {result['date']} — {label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
