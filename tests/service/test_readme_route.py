"""The README's custom-route example works as printed."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import ServerFactory

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def readme_route(tmp_path: Path) -> Iterator[str]:
    """The README's ``myroute.py`` written out and importable."""
    match = re.search(r"```python\n(# myroute\.py.*?)```", README.read_text(), re.S)
    assert match is not None, "README.md lost its custom-route example"
    (tmp_path / "myroute.py").write_text(match.group(1))
    sys.path.insert(0, str(tmp_path))
    try:
        yield "myroute:route"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("myroute", None)


async def test_readme_route_stores_schedules_relays_and_dumps(
    server: ServerFactory, readme_route: str
) -> None:
    srv = await server(f'server.route="{readme_route}"', 'msilo.snd_time_avp="$avp(snd_time)"')
    alice = await srv.agent("alice")
    assert (await alice.message("sip:bob@127.0.0.1", "stored")).status == 202
    later = await alice.message(
        "sip:bob@127.0.0.1", "later", headers=["X-Deliver-At: 20301231120000"]
    )
    assert later.status == 202
    rows = await srv.store.list("bob", "127.0.0.1")
    assert [r.snd_time > 0 for r in rows] == [False, True]
    bob = await srv.agent("bob")
    assert (await bob.register(600)).status == 200
    [got] = await bob.wait_requests(1)
    assert got.request.body.endswith(b"stored")
    assert (await alice.message("sip:bob@127.0.0.1", "live")).status == 200  # relayed
