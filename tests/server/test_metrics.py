"""``/metrics`` of a real ``msilo serve``: the gauges (database, queues, silo size and age)
and histograms (202 latency, delivery latency, batch sizes, dump duration) hold what
really happened; histograms never go backwards when a worker dies."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from msilo.server.stats import COUNTERS, GAUGES, HISTOGRAMS, StatsBlock, prometheus_text
from tests.server.conftest import Instance, wait_for
from tests.service.sipua import UserAgent


def scrape(instance: Instance) -> dict[str, float]:
    """Every sample of /metrics as ``name{labels}`` -> value."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(instance.text("/metrics")):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def test_histogram_cells_fold_into_cumulative_buckets() -> None:
    block = StatsBlock(rows=2)
    for value in (0.0005, 0.003, 0.003, 7.0):
        block.counters(0).observe("message_reply_seconds", value)
    block.counters(1).observe("message_reply_seconds", 0.02)
    block.counters(1).set_gauge("queue_depth", 5)
    text = prometheus_text({}, histograms=block.histogram_total()).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, s.labels.get("le")): s.value
        for s in families["msilo_message_reply_seconds"].samples
    }
    assert samples[("msilo_message_reply_seconds_bucket", "0.001")] == 1
    assert samples[("msilo_message_reply_seconds_bucket", "0.005")] == 3
    assert samples[("msilo_message_reply_seconds_bucket", "0.025")] == 4
    assert samples[("msilo_message_reply_seconds_bucket", "5")] == 4
    assert samples[("msilo_message_reply_seconds_bucket", "+Inf")] == 5
    assert samples[("msilo_message_reply_seconds_count", None)] == 5
    assert abs(samples[("msilo_message_reply_seconds_sum", None)] - 7.0265) < 1e-9
    assert block.gauges(1)["queue_depth"] == 5 and block.gauges(0)["queue_depth"] == 0
    assert block.total()["stored_messages"] == 0  # gauges and histograms are not counters
    block.close()
    # No histogram or gauge family shares a name with a counter's (OpenMetrics drops _total).
    assert not set(HISTOGRAMS) & set(COUNTERS) and not set(GAUGES) & set(COUNTERS)


async def test_metrics_report_what_happened(serve: Callable[..., Instance], tmp_path: Path) -> None:
    srv = serve(f"sqlite:///{tmp_path}/m.db", "server.workers=2", "msilo.check_time=1")
    health = await srv.wait_ready(2)
    alice = await UserAgent(srv.address, user="alice", domain="127.0.0.1").start()
    try:
        for i in range(6):
            assert (await alice.message("sip:bob@127.0.0.1", f"m{i}")).status == 202
        stored_at = time.time()
        m = await wait_for(
            lambda: scrape(srv), lambda m: m.get("msilo_silo_rows") == 6, 15, "silo_rows", srv
        )
        assert m["msilo_database_up"] == 1
        assert m["msilo_message_reply_seconds_count"] == 6
        assert m['msilo_message_reply_seconds_bucket{le="+Inf"}'] == 6
        assert 0 < m["msilo_message_reply_seconds_sum"] < 6 * 5
        assert m["msilo_batch_size_rows_count"] == m["msilo_batch_flushes_total"]
        assert m["msilo_batch_size_rows_sum"] == 6
        for worker in ("0", "1"):
            assert m[f'msilo_queue_depth{{worker="{worker}"}}'] == 0
            assert m[f'msilo_queue_capacity{{worker="{worker}"}}'] == 10000
        age = m["msilo_oldest_message_age_seconds"]
        assert 0 <= age <= time.time() - stored_at + 20
        # bob comes online: six deliveries, one dump.
        bob = await UserAgent(srv.address, user="bob", domain="127.0.0.1").start()
        try:
            assert (await bob.register(600)).status == 200
            await bob.wait_requests(6, timeout=15)
        finally:
            bob.close()
        m = await wait_for(
            lambda: scrape(srv),
            lambda m: m.get("msilo_delivery_latency_seconds_count") == 6
            and m.get("msilo_silo_rows") == 0,
            15, "deliveries counted", srv,
        )  # fmt: skip
        assert m["msilo_dump_duration_seconds_count"] == 1
        assert m["msilo_oldest_message_age_seconds"] == 0
        assert m['msilo_delivery_latency_seconds_bucket{le="60"}'] == 6
        # A worker dies: what it measured stays in the totals.
        before = m["msilo_message_reply_seconds_count"]
        os.kill(health["workers"][0]["pid"], signal.SIGKILL)
        await srv.wait_ready(2)
        after = scrape(srv)
        assert after["msilo_message_reply_seconds_count"] == before
        for name in HISTOGRAMS:
            assert after[f"msilo_{name}_count"] >= m[f"msilo_{name}_count"]
    finally:
        alice.close()
