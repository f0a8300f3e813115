"""ReadinessProbe: one bounded upstream check at a time, its answer reused briefly."""

from __future__ import annotations

import asyncio
import time

from ccproxy.readiness import ReadinessProbe


class Check:
    def __init__(self, answer: bool = True, hang: bool = False, fail: bool = False) -> None:
        self.calls = 0
        self.answer, self.hang, self.fail = answer, hang, fail

    async def __call__(self) -> bool:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail:
            raise ConnectionError("refused")
        await asyncio.sleep(0.01)
        return self.answer


def test_a_hung_upstream_is_not_ready_within_the_timeout_and_probes_do_not_pile_up():
    check = Check(hang=True)
    probe = ReadinessProbe(check, timeout_s=0.2, remember_s=0.0)

    async def many() -> list[bool]:
        return await asyncio.gather(*(probe() for _ in range(50)))

    started = time.monotonic()
    answers = asyncio.run(many())
    assert answers == [False] * 50
    assert time.monotonic() - started < 2.0
    assert check.calls == 1  # fifty probes, one upstream call


def test_an_answer_is_reused_for_a_while_then_asked_again():
    now = [100.0]
    check = Check(answer=True)
    probe = ReadinessProbe(check, timeout_s=1.0, remember_s=1.0, clock=lambda: now[0])

    async def run() -> None:
        assert await probe() is True
        now[0] += 0.5
        assert await probe() is True
        assert check.calls == 1
        now[0] += 0.6
        check.answer = False
        assert await probe() is False
        assert check.calls == 2

    asyncio.run(run())


def test_a_failing_check_is_not_ready():
    assert asyncio.run(ReadinessProbe(Check(fail=True))()) is False


def test_a_probe_that_gives_up_does_not_cancel_the_check_for_the_others():
    check = Check(answer=True)
    probe = ReadinessProbe(check, timeout_s=1.0, remember_s=0.0)

    async def run() -> bool:
        impatient = asyncio.ensure_future(probe())
        patient = asyncio.ensure_future(probe())
        await asyncio.sleep(0)
        impatient.cancel()
        return await patient

    assert asyncio.run(run()) is True
    assert check.calls == 1
