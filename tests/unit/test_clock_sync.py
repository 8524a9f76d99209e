"""The clock-offset rule: the fastest sample within the round-trip bound, or none."""

from __future__ import annotations

from trading.exchange.clock_sync import ClockSample, best_sample


def test_the_fastest_sample_within_the_bound_gives_the_offset() -> None:
    samples = [ClockSample(1_000, 1_400, 1_300), ClockSample(2_000, 2_020, 2_510), ClockSample(3_000, 3_090, 3_545)]
    best = best_sample(samples, max_rtt_ms=1_000)
    assert best is samples[1]
    assert (best.rtt_ms, best.offset_ms) == (20, 500)  # 2510 - 2010


def test_a_slow_sample_is_never_trusted_however_it_is_placed() -> None:
    # A hung /time answered after 20 s would claim an offset of about -10 s (the incident of issue 14).
    hung = ClockSample(0, 20_442, 221)
    assert hung.offset_ms == -10_000
    assert best_sample([hung], max_rtt_ms=1_000) is None
    assert best_sample([hung, ClockSample(30_000, 30_010, 30_007)], max_rtt_ms=1_000) == ClockSample(30_000, 30_010,
                                                                                                     30_007)


def test_no_samples_or_a_clock_that_ran_backwards_give_no_offset() -> None:
    assert best_sample([]) is None
    assert best_sample([ClockSample(5_000, 4_990, 5_000)]) is None  # our clock stepped back mid-sample
