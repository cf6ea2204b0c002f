"""CI smoke test of launcher/bench_scale.py (issue 26): the smallest valid NextStep scale on CPU, a few tokens.
It checks the JSON's keys and that its figures agree with each other; it asserts no timing."""
from __future__ import annotations

import json
import math

import pytest

from fastardiff_ds.scalebench.shapes import scaled_config

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_scale", Path(__file__).parents[2] / "launcher/bench_scale.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_bench_scale_tiny_json_is_complete_and_consistent(tmp_path):
    out = tmp_path / "s.json"
    rc = bench.main(["--cpu-dry-run", "--tokens", "12", "--accept", "0.5", "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    for key in ("shape", "scale", "device", "per_call_ms", "rows", "max_model_error", "break_even_acceptance",
                "planned_bytes", "measured_tokens", "num_tokens", "extrapolated", "clock"):
        assert key in d
    assert d["shape"] == "nextstep-1.1" and d["scale"] == 0.025 and d["device"]["type"] == "cpu"
    assert d["extrapolated"] == (d["measured_tokens"] < d["num_tokens"]) and d["num_tokens"] == 1024
    calls = d["per_call_ms"]["eager"]["at_mean_kv"]
    for name in ["decode_t_b2", "draft_b1_k1", "draft_b1_k2", "chain_teacher", "chain_student",
                 *(f"verify_t_b1_k{k}" for k in range(1, 9))]:
        assert calls[name] > 0
    for glue in ("glue_token_baseline", "glue_token_dmd", "glue_round", "kv_rollback"):  # the loops' own work
        assert glue in calls and math.isfinite(calls[glue])
    assert {"baseline", "dmd", "fastardiff"} <= set(d["model_terms"])
    assert set(d["rows"]) == {"baseline", "dmd", "fastardiff@0.5"}
    T = d["measured_tokens"]
    for kind, chain, decode in (("baseline", "chain_teacher", "decode_t_b2"), ("dmd", "chain_student", "verify_t_b1_k1")):
        n = d["rows"][kind]["calls"]  # the exact calls generate_ar makes: 1 prefill, N chains, N-1 decodes
        assert n == {f"prefill_t_b{2 if kind == 'baseline' else 1}": 1, chain: T, decode: T - 1,
                     f"glue_token_{kind}": T}
    errs = []
    for r in d["rows"].values():
        assert r["measured_s_per_image"] > 0 and r["modelled_s_per_image"] > 0
        assert len(r["images"]) >= 1
        err = abs(r["modelled_s_per_image"] - r["measured_s_per_image"]) / r["measured_s_per_image"]
        assert math.isclose(r["model_error"], err, rel_tol=1e-6)
        m, g = r["measured_s_per_image"], r["modelled_at_mean_costs_s_per_image"]  # the cross-check pricing
        assert g > 0 and math.isclose(r["model_error_at_mean_costs"], abs(g - m) / m, rel_tol=1e-6)
        errs.append(err)
    # max_model_error is the max over rows of |measured - modelled| / measured
    assert math.isclose(d["max_model_error"], max(errs), rel_tol=1e-9)
    fa = d["rows"]["fastardiff@0.5"]
    assert fa["accepted"] <= fa["drafted"] and fa["rounds"] >= 1
    n = fa["calls"]  # a chain per draft, one per round, one for token 0; a verify and a glue term per round
    assert n["chain_student"] == fa["drafted"] + fa["rounds"] + 1 and n["glue_round"] == fa["rounds"]
    assert sum(v for k, v in n.items() if k.startswith("verify_t_b1_k")) == fa["rounds"]
    assert fa["drafted"] + fa["rounds"] >= d["measured_tokens"] - 1  # every round commits a token
    be = d["break_even_acceptance"]
    assert be is None or 0.0 <= be <= 1.0
    b = d["acceptance_targets"]["eager"]["at_bundled_rule"]  # the README's per-image seconds
    g = d["gamma"]
    assert math.isclose(1 + sum(b["per_draft_acceptance"] ** j for j in range(1, g + 1)), b["accepted_length"],
                        abs_tol=1e-3)
    s = b["modelled_s"]
    assert math.isclose(b["fastardiff_vs_dmd"], s["dmd"] / s["fastardiff"], rel_tol=1e-9)


def test_acceptance_for_length_inverts_the_expected_round():
    from fastardiff_ds.scalebench.costmodel import acceptance_for_length

    assert acceptance_for_length(1.0, 4) == 0.0 and acceptance_for_length(5.0, 4) == 1.0
    a = acceptance_for_length(3.0, 4)
    assert math.isclose(1 + a + a**2 + a**3 + a**4, 3.0, abs_tol=1e-3)
    with pytest.raises(ValueError, match="accepted length"):
        acceptance_for_length(6.0, 4)


def test_bench_scale_refuses_invalid_scales(capsys):
    with pytest.raises(ValueError, match="KV heads"):
        scaled_config("nextstep-1.1", 0.4)  # 16 heads over 3 KV heads
    assert bench.main(["--device", "cpu", "--scale", "0.4"]) == 2
    assert "nearest valid scales" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must be in"):
        scaled_config("nextstep-1.1", 1.5)


def test_bench_scale_refuses_a_shape_the_device_cannot_hold(capsys):
    """The full shape in fp32 on this host (~60 GB planned): refused with planned and free bytes, nothing built."""
    from fastardiff_ds.scalebench.shapes import available_bytes

    if available_bytes("cpu") > 80 * 2**30:
        pytest.skip("this host could hold the full shape")
    assert bench.main(["--device", "cpu", "--scale", "1.0"]) == 2
    err = capsys.readouterr().err
    assert "bytes planned" in err and "free" in err
