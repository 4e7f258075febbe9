"""The CRM simulator of ``cti_bridge.sim.crm`` in its own process, for bench_e2e.py.

It is the product's ``CrmSimulator`` unchanged (same request hot path: one list append per request,
token check, canned answer), plus one read-only control path for the benchmark, answered off the
hot path: ``GET /_sim/bench/arrivals?since=K`` gives, for every request received from index K on,
its arrival time (``time.time()``), its status and the ``sentAt`` field of its JSON body (the
benchmark's events carry the time they were pushed, and the mapping renders it into the payload).
The standalone ``python -m cti_bridge.sim.crm`` answers only counts (``/_sim/stats``), not arrival
times, which the latency measurement needs.

    python bench/sim_crm.py [--port 0] [--client ID:SECRET ...] [--tokens K]

Prints one JSON line ``{"url": ..., "token_url": ..., "refresh_tokens": {client: [K tokens]}}`` when
ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal

from aiohttp import web

from cti_bridge.sim.crm import CrmSimulator


class BenchCrmSimulator(CrmSimulator):
    async def _control(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        if path == "/_sim/bench/arrivals" and request.method == "GET":
            since = int(request.query.get("since", "0"))
            out: list[list[object]] = []
            for rec in self.received[since:]:
                sent_at: object = None
                try:
                    doc = json.loads(rec.body)
                    if isinstance(doc, dict):
                        sent_at = doc.get("sentAt")
                except ValueError:
                    pass
                out.append([rec.at, rec.status, sent_at])
            return web.json_response({"count": len(self.received), "arrivals": out})
        if path == "/_sim/bench/last" and request.method == "GET":
            n = len(self.received)
            return web.json_response(
                {
                    "received": n,
                    "first_at": self.received[0].at if n else None,
                    "last_at": self.received[-1].at if n else None,
                    "token_requests": dict(self.token_counts),
                }
            )
        return await super()._control(request, path)


async def serve(args: argparse.Namespace) -> None:
    sim = BenchCrmSimulator(args.host, args.port)
    sim.expires_in = args.expires_in
    await sim.start()
    tokens: dict[str, list[str]] = {}
    for entry in args.client:
        client_id, _, secret = entry.partition(":")
        sim.add_client(client_id, secret)
        tokens[client_id] = [sim.issue_refresh_token(client_id) for _ in range(args.tokens)]
    print(json.dumps({"url": sim.url, "token_url": sim.token_url, "refresh_tokens": tokens}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--expires-in", type=int, default=3600)
    parser.add_argument("--client", action="append", default=[], metavar="ID:SECRET")
    parser.add_argument("--tokens", type=int, default=1, help="refresh tokens to issue per client")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
