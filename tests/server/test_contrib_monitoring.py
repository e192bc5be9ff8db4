"""contrib/grafana/msilo.json and contrib/prometheus/msilo-alerts.yml only use metrics that
a real ``msilo serve`` exports, are valid PromQL (promtool), and the alerts fire when they
should (promtool test rules)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import ROOT, Instance, wait_for
from tests.service.sipua import UserAgent

DASHBOARD = ROOT / "contrib" / "grafana" / "msilo.json"
ALERTS = ROOT / "contrib" / "prometheus" / "msilo-alerts.yml"
ALERT_TESTS = ROOT / "contrib" / "prometheus" / "msilo-alerts.test.yml"
METRIC = re.compile(r"\bmsilo_[a-z0-9_]+")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every sample name /metrics has once a leader counted the table and traffic ran."""
    tmp = tmp_path_factory.mktemp("metrics")
    srv = Instance(
        tmp, "metrics", f"sqlite:///{tmp}/m.db", ("server.workers=1", "msilo.check_time=1")
    )
    try:

        async def run() -> str:
            await srv.wait_ready(1)
            ua = await UserAgent(srv.address, user="alice", domain="127.0.0.1").start()
            try:
                assert (await ua.message("sip:bob@127.0.0.1", "hi")).status == 202
            finally:
                ua.close()
            text: str = await wait_for(
                lambda: srv.text("/metrics"), lambda t: "msilo_silo_rows " in t, 15, "rows", srv
            )
            return text

        text = asyncio.run(run())
    finally:
        srv.kill_all()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        out.extend((panel["title"], t["expr"]) for t in panel["targets"])
    return out


def test_every_dashboard_query_names_exported_metrics(exported: set[str]) -> None:
    exprs = _dashboard_exprs()
    assert len(exprs) >= 20
    for title, expr in exprs:
        names = METRIC.findall(expr)
        assert names, f"{title}: {expr!r} names no msilo metric"
        missing = [n for n in names if n not in exported]
        assert not missing, f"{title}: {missing} not exported by msilo"


def test_every_alert_names_exported_metrics(exported: set[str]) -> None:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {r["alert"] for r in rules} >= {
        "MsiloDatabaseDown", "MsiloQueueNearFull", "MsiloLeaderMissing", "MsiloOldMessages",
    }  # fmt: skip
    for rule in rules:
        missing = [n for n in METRIC.findall(rule["expr"]) if n not in exported]
        assert not missing, f"{rule['alert']}: {missing} not exported by msilo"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # Grafana's $__rate_interval is filled in by Grafana; promtool sees a real range.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, (_, expr) in enumerate(_dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_pass_promtool_and_fire_when_they_should() -> None:
    check = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        ["promtool", "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent, capture_output=True, text=True,
    )  # fmt: skip
    assert test.returncode == 0, test.stdout + test.stderr


def test_readme_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    """The README's prometheus.yml, as printed, with the rules file where contrib keeps it."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"```yaml\n(# prometheus\.yml\n.*?)```", readme, re.S)
    assert match is not None, "README lost its prometheus.yml example"
    config = match.group(1).replace("/etc/prometheus/msilo-alerts.yml", str(ALERTS))
    assert str(ALERTS) in config
    path = tmp_path / "prometheus.yml"
    path.write_text(config)
    out = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 6 rules found" in out.stdout
