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
    assert set(d["rows"]) == {"baseline", "dmd", "fastardiff@0.5"}
    errs = []
    for r in d["rows"].values():
        assert r["measured_s_per_image"] > 0 and r["modelled_s_per_image"] > 0
        errs.append(r["model_error"])
        assert math.isclose(r["model_error"], abs(r["modelled_s_per_image"] - r["measured_s_per_image"])
                            / r["measured_s_per_image"], rel_tol=1e-6)
    assert math.isclose(d["max_model_error"], max(errs))
    fa = d["rows"]["fastardiff@0.5"]
    assert fa["accepted"] <= fa["drafted"] and fa["rounds"] >= 1
    assert fa["drafted"] + fa["rounds"] >= d["measured_tokens"] - 1  # every round commits a token
    be = d["break_even_acceptance"]
    assert be is None or 0.0 <= be <= 1.0


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
