"""The attack suite of issue 13 (`evaluation/attack_check.py`): a few cheap cases through its function,
against a real `molcloak serve` of the tiny model on loopback."""

from __future__ import annotations

import pytest

from molcloak.evaluation import attack_check
from molcloak.pipeline.errors import ConfigError

CHEAP = ["malformed_json", "nan_infinity", "declared_oversize_body", "unknown_key_id"]


@pytest.mark.slow
def test_cheap_cases_of_the_attack_suite_hold(tiny_binary, tmp_path):
    result = attack_check.run(tiny_binary[2], CHEAP, work=tmp_path, time_budget=600)
    rows = result["cases"]
    assert [r["case"] for r in rows] == CHEAP
    assert all(r["held"] for r in rows) and result["all_held"], attack_check.table(rows)
    assert all(set(r) >= {"case", "expected", "observed", "held", "seconds"} for r in rows)
    assert list(result["servers"]) == ["main"]  # one server, on loopback, stopped at the end
    assert "--host 127.0.0.1" in result["servers"]["main"]
    assert "| nan_infinity | 422 RequestValidationError |" in attack_check.table(rows)


def test_an_unknown_case_is_refused_before_any_server_starts():
    with pytest.raises(ConfigError, match="unknown case.*nope.*malformed_json"):
        attack_check.select(["nope"])
