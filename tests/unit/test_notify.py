import asyncio

from appliance.control.notify import VersionWatch


def test_notify_burst_wakes_waiters_once_with_the_last_version() -> None:
    async def main() -> list[int]:
        watch = VersionWatch(5, batch=0.05)
        waiters = [asyncio.create_task(watch.wait(5, timeout=5)) for _ in range(100)]
        await asyncio.sleep(0)
        for v in (6, 7, 8):
            watch.bump(v)
        return await asyncio.gather(*waiters)

    assert set(asyncio.run(main())) == {8}


def test_notify_returns_at_once_when_already_past() -> None:
    async def main() -> int:
        watch = VersionWatch(9)
        return await watch.wait(3, timeout=5)

    assert asyncio.run(main()) == 9


def test_notify_times_out_with_the_current_version() -> None:
    async def main() -> tuple[int, float]:
        watch = VersionWatch(4)
        loop = asyncio.get_running_loop()
        start = loop.time()
        got = await watch.wait(4, timeout=0.05)
        return got, loop.time() - start

    got, took = asyncio.run(main())
    assert got == 4 and 0.04 < took < 1


def test_notify_old_bump_is_ignored() -> None:
    async def main() -> int:
        watch = VersionWatch(10, batch=0.01)
        watch.bump(7)
        return await watch.wait(10, timeout=0.05)

    assert asyncio.run(main()) == 10
