"""A few thousand cases of the fuzzer (tests/fuzz_harness.py) and the SIGKILL test, in CI.

The full run (over 100,000 container inputs, 10,000 of every other kind) and its figures are
in RELIABILITY.md; this subset runs the same mutators and checks with another seed.
"""

from __future__ import annotations

from tests import fuzz_harness


def test_fuzz_subset_raises_nothing_but_qconvert_errors():
    result = fuzz_harness.run(fuzz_harness.SUITE_RUN, seed=1)
    for kind, k in result["kinds"].items():
        assert k["cases"] == fuzz_harness.SUITE_RUN[kind], kind
        assert k["bugs"] == [], (kind, k["bugs"][:5])
        assert k["hangs"] == [] and k["crashes"] == [], (kind, k["hangs"][:5], k["crashes"][:5])
        # the mutants reach the checks, and some are still valid files that convert or read
        assert k["refused"] > 0 and k["ok"] > 0 and k["skipped"] == 0, (kind, k)


def test_sigkill_at_random_moments_leaves_no_partial_output_and_no_litter():
    result = fuzz_harness.sigkill_test(moments=6, seed=1)
    assert len(result["kills"]) == 6 and result["killed_while_writing"] >= 1
    assert result["partial_outputs"] == 0, result["kills"]
    assert result["litter"] == 0, result["kills"]
