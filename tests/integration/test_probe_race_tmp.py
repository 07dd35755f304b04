from __future__ import annotations
import asyncio, random, time
from tests.integration.test_run_lifecycle import *  # noqa

async def test_probe(pipelines, service) -> None:
    org = await make_org(service, "probe")
    ids = []
    misses = 0
    t0 = time.monotonic(); await service.runs._ledger.flush(); 
    for i in range(40):
        ids.append((await start(pipelines, org, "quick", {"label": str(i)}, wait=True)).run_id)
        await asyncio.sleep(random.uniform(0, 0.3))
        listed = [r.run_id for r in await list_all(pipelines, org, page_size=100)]
        if listed != ids[::-1]:
            misses += 1
    print("misses", misses)
    assert misses == 0
