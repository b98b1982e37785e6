"""The claims check: verdicts on each side of every threshold, from hand-made measurements, and bad claims files."""

from __future__ import annotations

from pathlib import Path

import pytest

from skip2lora.errors import UserError
from skip2lora.studies.efficiency.claims import (FAILED, NOT_TESTABLE, PARTIAL, VERIFIED, check_claims, load_claims,
                                                 parse_claims)

CLAIMS_FILE = Path(__file__).resolve().parents[2] / "configs" / "efficiency" / "claims.yaml"
FULL = 100_000_000


def cell(configuration: str, trainable: int, ppl: float, memory: float = 1000.0, size: int = 1000,
         final_bytes: int = 1000, method: str = "lora", total: int = FULL) -> dict:
    """An aggregated cell as results.aggregate_cells makes it (3 converged seeds: quality claims are graded)."""
    return {"task": "japanese", "model": "m", "size": size, "num_train": size, "configuration": configuration,
            "seeds_finished": 3, "seeds_converged": 3, "seeds_failed": 0, "method": method, "trainable_params": trainable,
            "total_params": total, "reduction_vs_full": FULL / trainable, "final_val_ppl": ppl,
            "peak_memory_mb": memory, "weights_bytes": final_bytes}


def full(ppl: float = 10.0, memory: float = 2000.0, size: int = 1000, final_bytes: int = 400_000_000) -> dict:
    return cell("full", FULL, ppl, memory, size, final_bytes, method="full")


def verdict(claim_yaml: dict, rows: list[dict]) -> dict:
    return check_claims(parse_claims({"claims": {"c": claim_yaml}}), rows)[0]


def one_check(metric: str, verified: dict, partial: dict, **params) -> dict:
    return {"statement": "s", "source": "src", "checks": [{"metric": metric, "verified": verified, "partial": partial,
                                                             **params}]}


SEED_RULE = one_check("reduction_at_equal_quality", {"at_least": 150}, {"at_least": 50}, tolerance_pct=5)


@pytest.mark.parametrize("trainable, ppl, expected", [
    (FULL // 200, 10.4, VERIFIED),   # 200x, within 5% of full
    (FULL // 150, 10.5, VERIFIED),   # exactly on both edges
    (FULL // 149, 10.0, PARTIAL),    # just below 150x
    (FULL // 50, 10.0, PARTIAL),     # exactly 50x
    (FULL // 49, 10.0, FAILED),      # just below 50x
    (FULL // 1000, 10.51, FAILED),   # 1000x but 5.1% worse than full: "equal performance" fails
])
def test_seed_parameter_rule_on_each_side_of_its_thresholds(trainable, ppl, expected):
    assert verdict(SEED_RULE, [full(), cell("lora-a", trainable, ppl)])["verdict"] == expected


def test_the_best_configuration_within_tolerance_counts():
    rows = [full(), cell("small", FULL // 1000, 12.0), cell("large", FULL // 100, 10.2)]
    result = verdict(SEED_RULE, rows)
    assert result["verdict"] == PARTIAL and result["checks"][0]["value"] == pytest.approx(100.0)


@pytest.mark.parametrize("lora_memory, expected", [(1000.0, VERIFIED), (1111.0, VERIFIED), (1112.0, PARTIAL),
                                                   (1666.0, PARTIAL), (1667.0, FAILED), (2500.0, FAILED)])
def test_memory_rule(lora_memory, expected):
    claim = one_check("memory_ratio", {"at_least": 1.8}, {"at_least": 1.2}, configuration="best")
    # full 2000 MB: 2000/1111 = 1.80 (verified), 2000/1112 = 1.799 (partial), 2000/1667 = 1.1998 (failed)
    assert verdict(claim, [full(memory=2000.0), cell("a", 1000, 10.0, memory=lora_memory)])["verdict"] == expected


@pytest.mark.parametrize("all_ppl, qkvo_ppl, expected", [
    (10.5, 10.8, VERIFIED),   # all-linear within 5% of full; attention-only >= 2% worse than all-linear
    (10.6, 10.9, PARTIAL),    # all-linear 6% worse than full
    (10.0, 10.1, PARTIAL),    # attention-only only 1% worse
    (11.6, 12.0, FAILED),     # all-linear 16% worse than full
    (10.0, 9.9, FAILED),      # attention-only better than all-linear
])
def test_qlora_claim_two_checks_worst_wins(all_ppl, qkvo_ppl, expected):
    claim = next(c for c in load_claims(CLAIMS_FILE, ["qlora-all-linear"]))
    rows = [full(10.0), cell("lora-r8-all", 1000, all_ppl), cell("lora-r8-qkvo", 500, qkvo_ppl)]
    assert check_claims([claim], rows)[0]["verdict"] == expected


@pytest.mark.parametrize("small_gap, large_gap, expected", [(1.0, 1.03, VERIFIED), (1.0, 1.01, PARTIAL),
                                                            (1.1, 1.0, FAILED)])
def test_gap_growth_over_data_sizes(small_gap, large_gap, expected):
    claim = one_check("gap_growth", {"at_least": 1.02}, {"at_least": 1.0}, configuration="lora")
    rows = [full(10.0, size=1000), cell("lora", 1000, 10.0 * small_gap, size=1000),
            full(8.0, size=5000), cell("lora", 1000, 8.0 * large_gap, size=5000)]
    assert verdict(claim, rows)["verdict"] == expected


def test_claims_about_larger_models_are_not_testable_here_but_report_figures():
    claim = next(c for c in load_claims(CLAIMS_FILE, ["lora-checkpoint"]))
    rows = [full(final_bytes=400_000_000), cell("lora-r4-qv", 1000, 10.0, final_bytes=40_000)]
    result = check_claims([claim], rows)[0]
    assert result["verdict"] == NOT_TESTABLE
    assert result["checks"][0]["value"] == pytest.approx(10_000.0) and "175,000,000,000" in result["reason"]


def test_missing_runs_make_a_claim_not_testable():
    claim = next(c for c in load_claims(CLAIMS_FILE, ["biderman-rank"]))
    result = check_claims([claim], [full(), cell("lora-r4-qv", 1000, 10.0)])[0]
    assert result["verdict"] == NOT_TESTABLE and "missing or failed" in result["reason"]


def test_shipped_claims_file_has_the_required_claims_each_with_thresholds():
    claims = {c.name: c for c in load_claims(CLAIMS_FILE)}
    assert {"seed-parameters", "seed-memory", "seed-model-sizes", "lora-checkpoint", "lora-memory",
            "qlora-all-linear", "biderman-rank", "biderman-data"} <= set(claims)
    assert all(check.verified and check.partial for claim in claims.values() for check in claim.checks)
    assert "no primary source" in claims["seed-model-sizes"].source
    assert claims["seed-parameters"].checks[0].verified.value == 150 and claims["seed-parameters"].checks[0].partial.value == 50


@pytest.mark.parametrize("document, message", [
    ({"claims": {"c": {"statement": "s", "source": "x", "checks": [{"metric": "memory_ratio"}]}}}, "has no thresholds"),
    ({"claims": {"c": {"statement": "s", "source": "x"}}}, "has no checks"),
    ({"claims": {"c": {"statement": "s", "source": "x", "checks": [{"metric": "speed", "verified": {"at_least": 1},
                                                                     "partial": {"at_least": 1}}]}}}, "unknown metric"),
    ({"claims": {"c": one_check("memory_ratio", {"at_least": 1}, {"at_least": 2})}}, "easier to meet"),
    ({"claims": {"c": one_check("memory_ratio", {"above": 1}, {"at_least": 1})}}, "at_least: N"),
    ({"claims": []}, "must hold 'claims:'"),
])
def test_bad_claims_are_one_line(document, message):
    with pytest.raises(UserError, match=message) as info:
        parse_claims(document)
    assert "\n" not in str(info.value)


def test_unknown_claim_names_are_one_line():
    with pytest.raises(UserError, match="unknown claims nope, nada: .* has seed-parameters"):
        load_claims(CLAIMS_FILE, ["nope", "nada"])


def test_claims_file_without_thresholds_is_refused(tmp_path):
    path = tmp_path / "claims.yaml"
    path.write_text("claims:\n  c:\n    statement: s\n    source: x\n    checks:\n      - metric: memory_ratio\n")
    with pytest.raises(UserError, match="claim c check 1 .memory_ratio. has no thresholds"):
        load_claims(path)


def test_median_over_an_even_number_of_groups_is_the_worse_middle_value():
    rows = [full(size=1000), cell("a", FULL // 200, 10.0, size=1000),
            full(size=5000), cell("a", FULL // 100, 10.0, size=5000)]
    result = verdict(one_check("parameter_reduction", {"at_least": 150}, {"at_least": 50}), rows)
    assert result["checks"][0]["value"] == pytest.approx(100.0) and result["verdict"] == PARTIAL
    rows = [full(10.0, size=1000), cell("b", 1000, 10.0, size=1000), full(10.0, size=5000), cell("b", 1000, 11.0, size=5000)]
    result = verdict(one_check("ppl_ratio", {"at_most": 1.05}, {"at_most": 1.15}, configuration="b"), rows)
    assert result["checks"][0]["value"] == pytest.approx(1.1) and result["verdict"] == PARTIAL
