"""Delivery ids (store/deliveries.py ``new_delivery_id``): UUIDs of version 7, so that ids made one
after another also sort one after another (the primary-key index grows at its edge)."""

from __future__ import annotations

import uuid

from cti_bridge.store.deliveries import new_delivery_id


def test_delivery_ids_are_version_7_uuids_in_creation_order() -> None:
    ids = [new_delivery_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:50]:
        parsed = uuid.UUID(text)
        assert parsed.version == 7 and str(parsed) == text  # canonical form, as before
    assert ids == sorted(ids)  # as text too: that is the order the database's index keeps
