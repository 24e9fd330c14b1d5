"""service/transport.py: a step's items cross as one message and come out one at a time, in order."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import pickle

from service.transport import StepTransport


def _send_from_child(transport: StepTransport) -> None:
    transport.send_many([("a", 1), ("b", 2)], 1)
    transport.send(("c", 3), 1)
    transport.send_many([("x", 0)], 0)


def test_items_sent_in_batches_by_another_process_arrive_in_order_at_their_api_server():
    transport = StepTransport.create(2)
    copy = pickle.loads(pickle.dumps(transport))  # what a spawned worker receives: the addresses only
    assert copy.addresses == transport.addresses

    async def receive(consumer: int, n: int) -> list:
        return [await transport.areceive(consumer, timeout=10) for _ in range(n)]

    async def scenario():
        first = asyncio.ensure_future(receive(1, 3))  # binds before the worker sends
        await asyncio.sleep(0.1)
        child = mp.get_context("spawn").Process(target=_send_from_child, args=(copy,))
        child.start()
        got = await first
        await asyncio.to_thread(child.join, 30)
        return got, child.exitcode

    got, exitcode = asyncio.run(scenario())
    assert exitcode == 0
    assert got == [("a", 1), ("b", 2), ("c", 3)]
    transport.close()
    assert not any(os.path.exists(a.removeprefix("ipc://")) for a in transport.addresses)


def test_a_receive_with_a_timeout_and_nothing_sent_returns_none():
    transport = StepTransport.create(1)
    try:
        assert asyncio.run(transport.areceive(0, timeout=0.05)) is None
    finally:
        transport.close()


def test_the_api_server_side_imports_no_torch():
    # server.py runs in the main and API-server processes; torch there costs seconds at start and at exit.
    import subprocess
    import sys

    from tests.helpers import ROOT

    code = "import sys, server, service.transport, service.step_log; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
