"""The progress estimator (vmferry.eta) fed made-up counter sequences: what a user
watching the bar relies on -- the percentage never goes back, the ETA never jumps
up, "converging" instead of a number while memory does not shrink, and an ETA
that matches the time really left when the rates hold."""
from __future__ import annotations

import random
from typing import Iterator, Optional, Sequence

import pytest

from vmferry.eta import Estimate, Estimator, Sample, format_eta

MiB = 1 << 20
DT = 0.1                    # how often flow.py publishes during a migration
MARGIN = 0.05               # rounding of the ETA to 0.1 s


def migration(storage: int, storage_rate: float, memory: int, memory_rate: float,
              *, dirty: Sequence[int] = (), iteration_s: float = 0.5,
              jitter: float = 0.0, seed: int = 1) -> Iterator[tuple[float, Sample]]:
    """Samples of a migration: STORAGE bytes copied at STORAGE_RATE, then MEMORY
    bytes at MEMORY_RATE in iterations of at most ITERATION_S; iteration 2, 3, ...
    starts with DIRTY[0], DIRTY[1], ... bytes dirty again (or what the previous
    one left, if more); after those, one last iteration sends the rest.  JITTER:
    each sample's rates vary by up to that share."""
    dirty_iterations = len(dirty)
    rnd = random.Random(seed)
    t = 0.0
    sd = 0
    while sd < storage:
        yield t, Sample(storage_done=sd, storage_left=storage - sd)
        sd = min(storage, sd + int(storage_rate * DT * (1 + rnd.uniform(-jitter, jitter))))
        t += DT
    md, left, it = 0, memory, 1
    it_start = t
    while True:
        yield t, Sample(storage_done=sd, memory_done=md, memory_left=left,
                        memory_started=True, memory_iteration=it)
        if left == 0 and it > dirty_iterations:
            break
        step = min(left, int(memory_rate * DT * (1 + rnd.uniform(-jitter, jitter))))
        md += step
        left -= step
        t += DT
        if (left == 0 or t - it_start >= iteration_s) and it <= dirty_iterations:
            it += 1
            it_start = t
            left = max(left, dirty[it - 2])
        elif left == 0:
            it += 1
    yield t + DT, Sample(storage_done=sd, memory_done=md, memory_started=True,
                         memory_iteration=it, finished=True)


def run(samples, **kw) -> list[tuple[float, Estimate]]:
    est = Estimator(**kw)
    return [(t, est.update(t, s)) for t, s in samples]


def assert_never_backwards(out: list[tuple[float, Estimate]], rise: float = 0.5) -> None:
    pcts = [e.percent for _, e in out]
    assert pcts == sorted(pcts), f"percent went down: {pcts}"
    shown: Optional[tuple[float, float]] = None
    for t, e in out:
        assert 0 <= e.percent <= 100
        if e.eta_s is None:
            continue
        assert e.eta_s >= 0
        if shown is not None:
            when, eta = shown
            assert e.eta_s <= eta + rise * (t - when) + MARGIN, \
                f"ETA rose from {eta} to {e.eta_s} in {t - when:.1f} s"
        shown = (t, e.eta_s)


@pytest.mark.parametrize("memory_rate", [100 * MiB, 300 * MiB])
def test_steady_rates_give_the_real_time_left(memory_rate):
    """Storage then memory at steady rates: once each part has been measured for a
    moment (memory's rate is the disks' until then), the ETA is within 10% of the
    time actually left; the percentage is 100 only at the end."""
    samples = list(migration(200 * MiB, 100 * MiB, 300 * MiB, memory_rate))
    out = run(samples, memory_expected=300 * MiB)
    end = out[-1][0]
    same = memory_rate == 100 * MiB
    assert_never_backwards(out)
    for t, e in out:
        if (same and t >= 0.5 or t >= 2.3) and t < end - 0.3:
            assert e.eta_s is not None and not e.converging
            assert abs(e.eta_s - (end - t)) <= 0.1 * (end - t) + 0.2, (t, e.eta_s, end - t)
    for (_, s), (_, e) in zip(samples, out):
        if s.storage_left or s.memory_left or not s.memory_started:
            assert e.percent < 100, (s, e)
    assert out[-1][1].percent == 100 and out[-1][1].eta_s == 0


def test_memory_not_started_counts_as_left():
    """Before memory migration starts, the guest's RAM is counted as work left: the
    disks alone never fill the bar, and the ETA includes memory at the rate measured
    so far."""
    storage, memory = 100 * MiB, 300 * MiB
    est = Estimator(memory_expected=memory)
    for i in range(11):
        e = est.update(i * DT, Sample(storage_done=i * 10 * MiB, storage_left=storage - i * 10 * MiB))
    assert e.percent == pytest.approx(25, abs=0.5)
    # 300 MiB of memory at the 100 MiB/s measured on the disks
    assert e.eta_s == pytest.approx(3.0, rel=0.1)


def test_no_rate_no_eta():
    est = Estimator(memory_expected=64 * MiB)
    e = est.update(0.0, Sample(storage_left=MiB))
    assert e.eta_s is None and not e.converging and e.percent == 0


def test_memory_that_does_not_shrink_is_converging():
    """A guest that dirties its memory as fast as it is sent: "converging" and no
    number until an iteration starts lower, then an ETA that has not jumped."""
    out = run(migration(0, 0, 64 * MiB, 128 * MiB, dirty=[48 * MiB] * 8, iteration_s=0.4),
              memory_expected=64 * MiB)
    assert_never_backwards(out)
    conv = [t for t, e in out if e.converging]
    assert conv, "never said converging while memory did not shrink"
    for t, e in out:
        if e.converging:
            assert e.eta_s is None
    # it ends: the last iterations send the rest, with an ETA again
    last_conv = max(conv)
    after = [e for t, e in out if t > last_conv]
    assert after and all(not e.converging for e in after)
    assert after[-1].percent == 100 and after[-1].eta_s == 0
    # and it was not said while the first pass over memory still shrank it
    first_dirty = 0.5      # the bulk pass takes 0.5 s at 128 MiB/s
    assert min(conv) > first_dirty


def test_converging_ends_when_memory_shrinks_again():
    """Memory stalls for a while, then shrinks (the downtime limit was raised, the
    guest calmed down): the ETA comes back while memory is still moving, and is no
    higher than the last one shown plus half the time spent converging."""
    out = run(migration(32 * MiB, 64 * MiB, 256 * MiB, 128 * MiB,
                        dirty=[200 * MiB] * 5 + [100 * MiB, 40 * MiB, 10 * MiB],
                        iteration_s=0.5), memory_expected=256 * MiB)
    assert_never_backwards(out)
    states = [e.converging for _, e in out]
    start = states.index(True)
    back = states.index(False, start)
    assert out[back][1].eta_s is not None and out[back][1].eta_s > 0, out[back]
    assert out[-1][1].percent == 100


def test_a_rate_drop_raises_the_eta_slowly():
    """The link slows to a tenth half way: the raw estimate jumps up tenfold, the
    shown ETA climbs no faster than half the wall time."""
    est = Estimator()
    out, done, total, t = [], 0, 400 * MiB, 0.0
    while done < total:
        out.append((t, est.update(t, Sample(storage_done=done, storage_left=total - done))))
        done = min(total, done + int((200 if done < total // 2 else 20) * MiB * DT))
        t += DT
    out.append((t, est.update(t, Sample(storage_done=done, finished=True))))
    assert_never_backwards(out)
    etas = [e.eta_s for _, e in out if e.eta_s is not None]
    assert max(etas) > etas[len(etas) // 3], "the ETA never caught up with the slow link"


def test_work_that_grows_never_moves_the_bar_back():
    """Dirty bytes found during a copy make the work longer: the percentage holds."""
    est = Estimator()
    pcts = []
    for i, (done, left) in enumerate([(0, 100), (50, 50), (60, 140), (100, 100), (200, 0)]):
        pcts.append(est.update(i * DT, Sample(storage_done=done * MiB, storage_left=left * MiB,
                                              finished=left == 0)).percent)
    assert pcts == sorted(pcts) and pcts[-1] == 100


def test_nothing_left_is_not_done_until_said():
    """QEMU reports no memory left between two iterations of a guest that goes on
    dirtying it: not 100% until the migration says it has finished."""
    est = Estimator()
    common = dict(memory_started=True, memory_iteration=2)
    assert est.update(0.0, Sample(memory_done=64 * MiB, memory_left=MiB, **common)).percent < 100
    e = est.update(0.1, Sample(memory_done=65 * MiB, memory_left=0, **common))
    assert e.percent < 100 and e.eta_s == 0
    e = est.update(0.2, Sample(memory_done=70 * MiB, memory_left=5 * MiB,
                               memory_started=True, memory_iteration=3))
    assert e.percent < 100
    assert est.update(0.3, Sample(memory_done=75 * MiB, finished=True)).percent == 100


@pytest.mark.parametrize("seed", range(20))
def test_noisy_migrations_never_run_backwards(seed):
    rnd = random.Random(seed)
    out = run(migration(rnd.randrange(0, 500) * MiB, rnd.uniform(20, 500) * MiB,
                        rnd.randrange(16, 512) * MiB, rnd.uniform(50, 1000) * MiB,
                        dirty=[rnd.randrange(0, 64) * MiB for _ in range(rnd.randrange(0, 8))],
                        iteration_s=rnd.uniform(0.1, 1.0), jitter=rnd.uniform(0, 0.8),
                        seed=seed),
              memory_expected=rnd.randrange(16, 512) * MiB)
    assert_never_backwards(out)
    assert out[-1][1].percent == 100 and out[-1][1].eta_s == 0


def test_format_eta():
    assert format_eta(None) == "--:--"
    assert format_eta(0) == "0:00"
    assert format_eta(64.2) == "1:05"
    assert format_eta(3 * 3600 + 5) == "3:00:05"
