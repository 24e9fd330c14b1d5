"""service/cache.py: keys, policy, LRU, single-flight, failures, cancellation."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image

from engine.request import EngineRequest, ImageInput, ImagePart, Message, SamplingParams, TextPart
from service.cache import CaptionCache, job_digest
from service.jobs import to_input


def make_job(color=(10, 20, 30), size=(32, 24), text="Caption the content of this image:", system="/no_think",
             **params) -> EngineRequest:
    params.setdefault("max_tokens", 64)
    params.setdefault("temperature", 0.0)
    messages = [Message("system", [TextPart(system)])] if system else []
    messages.append(Message("user", [TextPart(text), ImagePart(to_input(Image.new("RGB", size, color), 12))]))
    return EngineRequest("", messages=messages, params=SamplingParams(**params))


def run(coro):
    return asyncio.run(coro)


class Counter:
    """An async compute function that counts its calls and can be held open."""

    def __init__(self, result="caption", fail: BaseException | None = None):
        self.calls = 0
        self.result = result
        self.fail = fail
        self.release = asyncio.Event()
        self.hold = False

    async def __call__(self):
        self.calls += 1
        if self.hold:
            await self.release.wait()
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        return f"{self.result}-{self.calls}"


# Keys and policy ------------------------------------------------------------------------------

def test_key_depends_on_pixels_prompt_system_and_settings():
    cache = CaptionCache(size=8)
    base = cache.key_for(make_job())
    assert base == cache.key_for(make_job())  # same content, new objects
    variants = [
        make_job(color=(10, 20, 31)),
        make_job(size=(24, 32)),  # same bytes count, other shape
        make_job(text="Describe:"),
        make_job(system="/think"),
        make_job(system=""),
        make_job(max_tokens=65),
        make_job(stop=["."]),
    ]
    keys = {cache.key_for(j) for j in variants}
    assert base not in keys and len(keys) == len(variants)


def test_same_tiles_from_another_image_size_is_another_key():
    original = make_job()
    tiles = original.messages[-1].content[1].image.tiles
    resized = make_job()
    resized.messages[-1].content[1] = ImagePart(ImageInput(tiles.copy(), 64, 48))
    assert job_digest(original, False) != job_digest(resized, False)


def test_greedy_ignores_seed_and_top_p_but_keeps_stop_as_a_set():
    cache = CaptionCache(size=8)
    assert cache.key_for(make_job(seed=1, top_p=0.5)) == cache.key_for(make_job(seed=2, top_p=1.0))
    assert cache.key_for(make_job(stop=["a", "b", "a"])) == cache.key_for(make_job(stop=["b", "a"]))


def test_sampled_requests_only_with_cache_sampled():
    job = make_job(temperature=1.0, top_p=1.0)
    assert CaptionCache(size=8).key_for(job) is None
    sampled = CaptionCache(size=8, cache_sampled=True)
    key = sampled.key_for(job)
    assert key is not None
    assert key != sampled.key_for(make_job(temperature=0.0))
    assert key != sampled.key_for(make_job(temperature=1.0, seed=7))
    assert key != sampled.key_for(make_job(temperature=0.7))
    assert key != sampled.key_for(make_job(temperature=1.0, top_p=0.9))


def test_off_when_size_zero():
    assert CaptionCache(size=0).key_for(make_job()) is None
    assert CaptionCache(size=0).enabled is False
    with pytest.raises(ValueError):
        CaptionCache(size=-1)


# LRU ------------------------------------------------------------------------------------------

def test_hit_miss_and_lru_eviction():
    async def main():
        cache = CaptionCache(size=2)
        compute = Counter()
        assert await cache.get_or_compute("a", compute) == "caption-1"
        assert await cache.get_or_compute("b", compute) == "caption-2"
        assert await cache.get_or_compute("a", compute) == "caption-1"  # hit; "a" becomes most recent
        assert await cache.get_or_compute("c", compute) == "caption-3"  # evicts "b", the least recent
        assert len(cache) == 2 and compute.calls == 3
        assert await cache.get_or_compute("a", compute) == "caption-1"
        assert await cache.get_or_compute("b", compute) == "caption-4"  # recomputed
        assert compute.calls == 4 and len(cache) == 2

    run(main())


def test_none_key_and_disabled_cache_always_compute():
    async def main():
        for cache, key in ((CaptionCache(size=4), None), (CaptionCache(size=0), "k")):
            compute = Counter()
            assert await cache.get_or_compute(key, compute) == "caption-1"
            assert await cache.get_or_compute(key, compute) == "caption-2"
            assert compute.calls == 2 and len(cache) == 0

    run(main())


# Single-flight --------------------------------------------------------------------------------

def test_concurrent_identical_requests_generate_once():
    async def main():
        cache = CaptionCache(size=4)
        compute = Counter()
        compute.hold = True
        tasks = [asyncio.create_task(cache.get_or_compute("k", compute)) for _ in range(10)]
        await asyncio.sleep(0.01)
        assert cache.in_flight == 1 and compute.calls == 1
        other = asyncio.create_task(cache.get_or_compute("other", Counter("x")))  # other keys not blocked
        assert await other == "x-1"
        compute.release.set()
        assert await asyncio.gather(*tasks) == ["caption-1"] * 10
        assert cache.in_flight == 0 and compute.calls == 1
        assert await cache.get_or_compute("k", compute) == "caption-1" and compute.calls == 1  # stored

    run(main())


def test_failure_goes_to_every_waiter_and_is_not_stored():
    async def main():
        cache = CaptionCache(size=4)
        failing = Counter(fail=RuntimeError("engine broke"))
        failing.hold = True
        tasks = [asyncio.create_task(cache.get_or_compute("k", failing)) for _ in range(5)]
        await asyncio.sleep(0.01)
        failing.release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and str(r) == "engine broke" for r in results)
        assert failing.calls == 1 and len(cache) == 0 and cache.in_flight == 0
        # The next request tries again.
        assert await cache.get_or_compute("k", Counter("ok")) == "ok-1"

    run(main())


class LeaderGone(Exception):
    pass


def test_leader_only_error_goes_to_leader_and_waiters_retry():
    async def main():
        cache = CaptionCache(size=4, leader_only_errors=(LeaderGone,))
        first = Counter(fail=LeaderGone())
        first.hold = True
        retry = Counter("retry")
        leader = asyncio.create_task(cache.get_or_compute("k", first))
        await asyncio.sleep(0.01)
        waiters = [asyncio.create_task(cache.get_or_compute("k", retry)) for _ in range(3)]
        await asyncio.sleep(0.01)
        first.release.set()
        with pytest.raises(LeaderGone):
            await leader
        # One waiter became the new leader; the other two joined it.
        assert await asyncio.gather(*waiters) == ["retry-1"] * 3
        assert retry.calls == 1 and first.calls == 1

    run(main())


def test_cancelled_leader_does_not_cancel_work_for_waiters():
    async def main():
        cache = CaptionCache(size=4)
        compute = Counter()
        compute.hold = True
        leader = asyncio.create_task(cache.get_or_compute("k", compute))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(cache.get_or_compute("k", compute))
        await asyncio.sleep(0.01)
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        compute.release.set()
        assert await waiter == "caption-1" and compute.calls == 1

    run(main())


def test_work_is_cancelled_when_every_caller_left():
    async def main():
        cache = CaptionCache(size=4)
        cancelled = asyncio.Event()

        async def slow():
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return "never"

        callers = [asyncio.create_task(cache.get_or_compute("k", slow)) for _ in range(2)]
        await asyncio.sleep(0.01)
        for c in callers:
            c.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        await asyncio.wait_for(cancelled.wait(), 1)
        assert cache.in_flight == 0 and len(cache) == 0
        assert await cache.get_or_compute("k", Counter()) == "caption-1"  # a fresh flight works

    run(main())


def test_end_to_end_with_job_keys():
    async def main():
        cache = CaptionCache(size=4)
        compute = Counter()
        jobs = [make_job(), make_job(), make_job(color=(0, 0, 0)), make_job(temperature=1.0)]
        out = [await cache.get_or_compute(cache.key_for(j), compute) for j in jobs]
        assert out == ["caption-1", "caption-1", "caption-2", "caption-3"]
        assert compute.calls == 3 and len(cache) == 2  # the sampled request was not stored

    run(main())
