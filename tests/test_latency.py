"""How `fit` measures latency on a shared machine: the load factor from the reference circuit, the quiet
time kept in the calibration file (safe under concurrent processes), the CPU window that tells a quiet machine
from a loaded one, and the search clock. Real subprocesses; no assertion is on time."""

from __future__ import annotations

import os

import numpy as np
import pytest

from molcloak.pipeline.compile import CompileConfig
from molcloak.pipeline.errors import ConfigError
from molcloak.pipeline.fit import Candidate, FitBudget
from molcloak.pipeline.latency import CpuWindow, Timing, describe
from molcloak.pipeline.pbs_cost import Calibration, quiet_time

# the compile setting of the candidates below (they are never compiled)
FIRST = CompileConfig(None, "approximate", 2**-40)


def test_normalization_arithmetic_and_the_quiet_reference(tmp_path):
    """312 ms measured while the reference runs 80 ms instead of its quiet 50 ms: load 1.6x, 195 ms."""
    t = Timing(0.312, reference_s=0.080, reference_quiet_s=0.050)
    assert np.isclose(t.load_factor, 1.6) and np.isclose(t.normalized_s, 0.195)
    assert describe(0.312, t.load_factor) == "312 ms measured, load factor 1.6x -> 195 ms normalized"
    assert describe(0.312, None) == "312 ms measured" and describe(None, 2.0) == "not timed"
    # a reference faster than its stored quiet time never makes a candidate slower; no reference: as measured
    assert Timing(0.2, 0.04, 0.05).load_factor == 1.0 and Timing(0.2).normalized_s == 0.2
    d = Timing(0.312, 0.08, 0.05).to_dict()
    assert d["median_run_s"] == 0.312 and np.isclose(d["normalized_run_s"], 0.195)
    # the budget decision: over 250 ms as measured, within it normalized; untimed: the prediction decides
    c = Candidate("physchem", {}, FIRST, "features", predicted_s=0.1, run_s=0.312, load_factor=1.6)
    assert c.fits(FitBudget(latency_ms=250)) and not c.fits(FitBudget(latency_ms=250, latency_check="raw"))
    assert c.to_dict()["run_normalized_s"] == pytest.approx(0.195) and "195 ms normalized" in c.latency_text
    untimed = Candidate("physchem", {}, FIRST, "features", predicted_s=0.3)
    assert untimed.checked_s("normalized") == 0.3 and untimed.latency_text == "300 ms predicted"
    with pytest.raises(ConfigError, match="--latency-check 'fast' is not one of normalized, raw"):
        FitBudget(latency_check="fast")
    # the quiet time: the fastest median seen on this machine for this circuit while few are seen, kept in
    # the file (every process adds its medians) ...
    cal = Calibration(tmp_path / "calib.json")
    assert cal.quiet_reference("8/5@1e-06 x8", 0.08) == 0.08
    assert cal.quiet_reference("8/5@1e-06 x8", 0.12) == 0.08  # a loaded minute does not raise it
    assert cal.quiet_reference("8/5@1e-06 x8", 0.07) == 0.07
    assert Calibration(tmp_path / "calib.json").reference["quiet_s"] == 0.07
    other = Calibration(tmp_path / "calib.json")  # another process sees a quieter minute: both use it
    assert (
        other.quiet_reference("8/5@1e-06 x8", 0.06) == 0.06
        and cal.quiet_reference("8/5@1e-06 x8", 0.09) == 0.06
    )
    assert cal.quiet_reference("9/5@1e-06 x8", 0.2) == 0.2  # another reference circuit starts over
    read_only = Calibration(tmp_path / "calib.json", measure=False)
    assert read_only.quiet_reference("9/5@1e-06 x8", 0.1) == 0.1
    assert Calibration(tmp_path / "calib.json").reference["quiet_s"] == 0.2  # measure=False writes nothing
    # ... then the 10th percentile of the last 256: one lucky minute (48 ms among quiet 70 ms medians, as
    # seen on this VM) does not become the quiet time, and a long loaded spell raises it only slowly
    seen = Calibration(tmp_path / "seen.json")
    quiet = [seen.quiet_reference("8/5@1e-06 x8", s) for s in [0.070 + 0.001 * (i % 3) for i in range(30)]]
    assert quiet[8] == 0.070 and seen.quiet_reference("8/5@1e-06 x8", 0.048) == pytest.approx(0.070)
    assert [seen.quiet_reference("8/5@1e-06 x8", 0.2) for _ in range(20)][-1] == pytest.approx(0.070)
    assert (
        len(seen.reference["recent"]) == 51
        and Calibration(tmp_path / "seen.json").reference == seen.reference
    )
    assert quiet_time([0.1] * 300) == 0.1 and quiet_time([0.3, 0.2]) == 0.2


def test_concurrent_fits_lose_none_of_each_others_reference_medians(tmp_path):
    """Every fit process adds its reference medians to one file; before the lock, two that read the same
    history each wrote back their own median and the last writer dropped the other's."""
    import subprocess
    import sys

    path = tmp_path / "calib.json"
    script = (
        "import sys\nfrom molcloak.pipeline.pbs_cost import Calibration\n"
        "for i in range(40):\n    Calibration(sys.argv[1]).quiet_reference('8/5@1e-06 x8', float(sys.argv[2]))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), v]) for v in ("0.07", "0.08", "0.09")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    recent = Calibration(path).reference["recent"]
    assert sorted(set(recent)) == [0.07, 0.08, 0.09] and all(
        recent.count(v) == 40 for v in (0.07, 0.08, 0.09)
    )


def test_a_quiet_machine_is_not_normalized_and_other_processes_are_seen():
    """On a quiet VM the reference itself ran 70-124 ms, so dividing by it passed a 323 ms model under a
    250 ms budget: when other processes use under 10 % of the CPU, the timing stands as measured."""
    import subprocess
    import sys
    import time

    assert Timing(0.312, 0.08, 0.05, others_cpu=0.02).load_factor == 1.0  # quiet: the reference's spread
    assert np.isclose(Timing(0.312, 0.08, 0.05, others_cpu=0.6).load_factor, 1.6)  # others: normalized
    assert Timing(0.312, 0.08, 0.05, others_cpu=0.02).to_dict()["others_cpu"] == 0.02
    # two real processes spinning beside this one: the window sees them, and not this process's own work
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)  # past their start-up
        window, end = CpuWindow(), time.monotonic() + 1.0
        while time.monotonic() < end:
            pass  # this process's own work is not "other load"
        busy = window.others()
    finally:
        for p in spin:
            p.kill()
            p.wait()
    assert busy is not None and busy >= min(0.5, 1.5 / os.cpu_count())


def test_search_clock_counts_quiet_minutes_with_a_wall_clock_stop():
    """--max-minutes 1 at load factor 2: a variant of 40 s wall costs 20 quiet seconds; the raw check and
    unmeasured time count in full; 3x the cap in wall-clock time always stops."""
    from molcloak.pipeline.latency import SearchClock

    t = [0.0]
    clock = SearchClock(1, normalized=True, now=lambda: t[0])
    t[0] = 40.0
    clock.charge(40.0, 2.0)
    assert clock.quiet_elapsed == 20.0 and not clock.out_of_time()
    t[0] = 100.0  # 60 s more, nothing charged: counted in full
    assert clock.quiet_elapsed == 80.0 and clock.out_of_time()
    loaded = SearchClock(1, normalized=True, now=lambda: t[0])
    t[0] = 100.0 + 170.0
    loaded.charge(170.0, 10.0)  # 17 quiet seconds, but 170 s of wall time
    assert not loaded.out_of_time()
    t[0] = 100.0 + 181.0
    loaded.charge(11.0, 10.0)
    assert loaded.quiet_elapsed < 60 and loaded.out_of_time()  # 3x the cap in wall-clock time
    raw = SearchClock(1, normalized=False, now=lambda: t[0])
    raw.charge(1000.0, 5.0)  # the raw check counts wall-clock time
    t[0] += 61.0
    assert raw.out_of_time() and not SearchClock(None, True, now=lambda: t[0]).out_of_time()


def test_the_gauges_keys_are_kept_named_by_their_parameters_and_replaced_when_unreadable(tmp_path):
    """The load gauge's reference circuit keeps its keys in molcloak's home for later processes: a second
    build loads the same secret key (each decrypts what the other computed: with another key, 8 random
    3-bit values would agree by chance once in 16 million), other crypto parameters get their own file,
    and an unreadable file is generated again."""
    from molcloak.pipeline.pbs_cost import layer_circuit

    def build(p_error=2**-40):
        return layer_circuit(4, 3, p_error, 8, np.random.default_rng(0), key_dir=tmp_path)

    first, enc = build()
    (kept,) = tmp_path.glob("*.keys")
    assert kept.stat().st_mode & 0o777 == 0o600
    again, _ = build()
    for out in (first.run(enc), again.run(again.encrypt(np.arange(0, 16, 2)))):
        assert first.decrypt(out).tolist() == again.decrypt(out).tolist()
    build(p_error=2**-20)
    assert len(list(tmp_path.glob("*.keys"))) == 2
    kept.write_bytes(b"not keys")
    third, enc3 = build()
    assert kept.stat().st_size > 1000 and third.decrypt(third.run(enc3)).shape == (8,)
