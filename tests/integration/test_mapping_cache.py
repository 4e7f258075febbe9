"""The compiled-mapping cache stays bounded over the process's life, on SQLite and PostgreSQL.

Every PUT of a context's mappings makes new rows (the old ones are retired and stay compiled for
the deliveries made with them), so a script PUTting the same mappings every minute grew the cache
by thousands of compiled mappings a day, for as long as the daemon ran. Past its bound the oldest
quarter goes; a mapping still needed is compiled again from its row."""

from __future__ import annotations

import json

from sqlmodel import Session

from cti_bridge.routing import MappingCache
from cti_bridge.store.db import Database
from cti_bridge.store.models import CrmContext, EventUriMapping, XelionContext


async def test_the_cache_keeps_the_newest_and_compiles_an_evicted_mapping_again(database: Database) -> None:
    def write(session: Session) -> list[int]:
        xc = XelionContext(host="h.example", tenant="t", admin_username="a", admin_password_enc="x")
        session.add(xc)
        session.flush()
        assert xc.id is not None
        crm = CrmContext(xelion_context_id=xc.id, authorization_server_uri="https://auth.example/token")
        session.add(crm)
        session.flush()
        assert crm.id is not None
        rows = [
            EventUriMapping(
                crm_context_id=crm.id,
                xelion_event="callHungUpEvent",
                crm_resource_uri=f"https://crm.example/calls/{i}",
                crm_resource_payload=json.dumps({"callId": "${callId}", "n": i}),
            )
            for i in range(20)
        ]
        session.add_all(rows)
        session.flush()
        return [r.id for r in rows if r.id is not None]

    ids = await database.run(write)
    cache = MappingCache(max_compiled=8)
    for mapping_id in ids:
        await database.run(lambda s, m=mapping_id: cache.get(s, m))
        assert len(cache) <= 8
    assert cache.peek(ids[-1]) is not None  # the newest stay
    assert cache.peek(ids[0]) is None  # the oldest went
    again = await database.run(lambda s: cache.get(s, ids[0]))  # compiled again from its row
    assert again.spec.crm_resource_uri == "https://crm.example/calls/0"
    assert cache.peek(ids[0]) is again and len(cache) <= 8
