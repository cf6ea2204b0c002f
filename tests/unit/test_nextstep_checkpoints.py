"""Official NextStep-1.x folders (tiny, written by tests/fixtures/nextstep_official.py) load exactly as downloaded:
config mapping for both key schemes, parity with an independent reference (transformers' Qwen2Model / LlamaModel
plus the official head's math re-written here), dtype and meta-device loading, overrides before the build,
refusal of settings we do not implement, and our own exports still loading."""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from nextstep_official import write_official  # noqa: E402

from fastardiff_ds.config import get_preset  # noqa: E402
from fastardiff_ds.models import (build_head, build_target, count_params, folder_kind, load_config,  # noqa: E402
                                  load_pretrained, official_config, save_pretrained)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["1-large", "1.1"])
def official(request, tmp_path_factory):
    return write_official(tmp_path_factory.mktemp(request.param), request.param)


def _raw_state(folder: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        state.update({k.removeprefix(prefix): v.float() for k, v in load_file(str(shard)).items()})
    return state


def _reference_backbone(folder: Path, state: dict):
    """transformers' own decoder, configured from the official config.json (Llama when o_proj has a bias)."""
    from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

    c = json.loads((folder / "config.json").read_text())
    kw = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
              num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
              num_key_value_heads=c["num_key_value_heads"], rms_norm_eps=c["rms_norm_eps"],
              rope_theta=c["rope_theta"], max_position_embeddings=c["max_position_embeddings"])
    # Llama's attention_bias covers o_proj too: the reference for `o_attention_bias: true`
    if c["o_attention_bias"]:
        model = LlamaModel(LlamaConfig(attention_bias=True, **kw))
    else:
        model = Qwen2Model(Qwen2Config(**kw))
    own = model.state_dict()
    model.load_state_dict({k: state[k] for k in own})
    return model.eval()


def _reference_head(sd: dict, x, t, c, depth: int):
    """NextStep's FlowMatchingHead.net (modeling_fm_head.py SimpleMLPAdaLN) written out as plain tensor math."""
    lin = lambda h, name: F.linear(h, sd[f"image_head.net.{name}.weight"], sd[f"image_head.net.{name}.bias"])  # noqa
    half = 128  # frequency_embedding_size 256
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    y = lin(F.silu(lin(torch.cat([args.cos(), args.sin()], -1), "time_embed.mlp.0")), "time_embed.mlp.2")
    y = y + lin(c, "cond_embed")
    h = lin(x, "input_proj")
    W = h.shape[-1]
    for j in range(depth):
        b = f"res_blocks.{j}"
        shift, scale, gate = lin(F.silu(y), f"{b}.adaLN_modulation.1").chunk(3, -1)
        n = F.layer_norm(h, (W,), sd[f"image_head.net.{b}.in_ln.weight"], sd[f"image_head.net.{b}.in_ln.bias"], 1e-6)
        h = h + gate * lin(F.silu(lin(n * (1 + scale) + shift, f"{b}.mlp.0")), f"{b}.mlp.2")
    shift, scale = lin(F.silu(y), "final_layer.adaLN_modulation.1").chunk(2, -1)
    return lin(F.layer_norm(h, (W,), eps=1e-6) * (1 + scale) + shift, "final_layer.linear")


@pytest.mark.parametrize("style,prefix,o_bias", [("1-large", "", False), ("1.1", "", False), ("1.1", "model.", True)])
def test_hidden_states_and_velocities_match_independent_reference(tmp_path, style, prefix, o_bias):
    folder = write_official(tmp_path / "ck", style, prefix=prefix, o_bias=o_bias)
    b = load_pretrained(folder, overrides=["model.dtype=float32"])
    state = _raw_state(folder, prefix)
    ref = _reference_backbone(folder, state)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 28, (2, 5), generator=g)
    tokens = torch.randn(2, 4, b.cfg.model.image.token_dim, generator=g)
    with torch.no_grad():
        ours = b.target.forward_train(ids, torch.ones_like(ids), tokens)
        emb = torch.cat([F.embedding(ids, state["embed_tokens.weight"]),
                         F.linear(tokens[:, :3], state["image_in_projector.weight"],
                                  state["image_in_projector.bias"])], 1)
        hidden = ref(inputs_embeds=emb, attention_mask=torch.ones(2, 8, dtype=torch.long)).last_hidden_state[:, -4:]
        cond = F.linear(hidden, state["image_out_projector.weight"], state["image_out_projector.bias"])
        x, t = torch.randn(8, tokens.shape[-1], generator=g), torch.rand(8, generator=g)
        v_ours = b.head(x, t, cond.reshape(8, -1))
        v_ref = _reference_head(state, x, t, cond.reshape(8, -1), b.cfg.model.head.depth)
    assert (ours.hidden - hidden).abs().max() < 1e-4
    assert (ours.cond - cond).abs().max() < 1e-4
    assert (v_ours - v_ref).abs().max() < 1e-4 and v_ref.abs().max() > 0.05  # a non-trivial velocity


def test_config_mapping_both_schemes(official):
    kind, data = folder_kind(official)
    cfg = load_config(official)
    assert kind == "official"
    assert cfg.preset == ("nextstep-1.1" if "genloss_width" in data else "nextstep-1-large")
    m = cfg.model
    assert (m.ar.hidden_size, m.ar.num_layers, m.ar.num_heads, m.ar.num_kv_heads) == (64, 2, 4, 2)
    assert (m.ar.vocab_size, m.ar.rope_theta, m.ar.rms_norm_eps) == (data["vocab_size"], 1e6, 1e-5)
    assert (m.head.width, m.head.depth, cfg.pretrain.batch_mul) == (32, 2, 4)
    assert (m.image.channels, m.image.patch_size, m.image.resolution, m.image.grid) == (16, 2, 64, 4)
    assert cfg.data.resolution == 64 and m.dtype == "bfloat16"
    assert (m.text.boi_id, m.text.eoi_id, m.text.image_placeholder_id) == (data["boi"], data["eoi"],
                                                                           data["image_placeholder_id"])
    assert m.text.tokenizer == "hf" and m.text.path == str(official)
    other = load_config(official, preset="tiny-bench")  # --preset only fills what config.json does not say
    assert other.preset == "tiny-bench" and other.model.ar.hidden_size == 64 and other.model.image.resolution == 64


def test_weights_load_in_model_dtype_without_fp32_copies(tmp_path, official):
    fp32_folder = write_official(tmp_path / "f32", dtype=torch.float32)
    for request, stored in (("bfloat16", official), ("bfloat16", fp32_folder)):
        b = load_pretrained(stored, overrides=[f"model.dtype={request}"])
        tensors = [*b.target.parameters(), *b.head.parameters()]
        assert {p.dtype for p in tensors} == {torch.bfloat16} and not any(p.is_meta for p in tensors)
        assert b.target.rotary_emb.inv_freq.dtype == torch.float32  # RoPE frequencies rebuilt in fp32
    with pytest.raises(ValueError, match="model.dtype"):
        load_config(official, overrides=["model.dtype=int8"])


@pytest.mark.parametrize("preset", ["nextstep-1-large", "nextstep-1.1"])
def test_full_size_official_config_builds_14b_on_meta(tmp_path, preset):
    """The real sizes through the mapping (config only; shapes checked on the meta device, no memory)."""
    key = "genloss" if preset == "nextstep-1.1" else "fm_head"
    updates = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                   num_key_value_heads=8, vocab_size=152064, max_position_embeddings=131072, head_dim=128)
    updates.update({f"{key}_{'width' if key == 'genloss' else 'dim'}": 1536,
                    f"{key}_{'depth' if key == 'genloss' else 'layers'}": 12})
    updates.update(dict(image_size=64) if key == "genloss" else dict(latent_size=64))
    folder = write_official(tmp_path / "c", "1.1" if key == "genloss" else "1-large", config_updates=updates)
    cfg = official_config(json.loads((folder / "config.json").read_text()), folder)
    with torch.device("meta"):
        ar, head = build_target(cfg), build_head(cfg)
    assert abs(count_params(ar) / 14e9 - 1) < 0.02 and abs(count_params(head) / 157e6 - 1) < 0.02
    assert (cfg.model.image.resolution, cfg.model.image.num_tokens, cfg.preset) == (512, 1024, preset)


def test_overrides_apply_before_the_build(official):
    with pytest.raises(ValueError, match="does not match the model built"):  # a 1-block head cannot take 2 blocks
        load_pretrained(official, overrides=["model.head.depth=1"])
    b = load_pretrained(official, overrides=["model.dtype=float32", "inference.num_steps=7"])
    assert next(b.target.parameters()).dtype == torch.float32 and b.cfg.inference.num_steps == 7


@pytest.mark.parametrize("key,value", [("use_gen_pos_embed", True), ("use_2d_rope", True),
                                       ("genloss_net_arch", "transformer"), ("attention_use_qk_norm", True),
                                       ("attention_bias", False), ("rope_scaling", {"type": "yarn"}),
                                       ("head_dim", 8)])
def test_unimplemented_settings_are_refused_by_name(official, key, value):
    data = {**json.loads((official / "config.json").read_text()), key: value}
    with pytest.raises(ValueError, match=key):
        official_config(data, official)


def test_bad_folders_name_the_problem(tmp_path, official):
    data = json.loads((official / "config.json").read_text())
    plain = {k: v for k, v in data.items() if k in ("hidden_size", "num_hidden_layers", "model_type", "vocab_size")}
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({**plain, "model_type": "qwen2"}))
    with pytest.raises(ValueError, match="plain language-model config"):
        load_config(tmp_path / "lm")
    if "genloss_width" in data:
        with pytest.raises(ValueError, match="fm_head_dim.*genloss_width"):
            official_config({**data, "fm_head_dim": 48}, official)
    with pytest.raises(ValueError, match="latent_size"):
        official_config({k: v for k, v in data.items() if k not in ("latent_size", "image_size")}, official)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        official_config({**data, "fancy_new_switch": True}, official)
    assert any("fancy_new_switch" in str(x.message) for x in w)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in official.iterdir():
        if f.name != "model-00002-of-00003.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003"):
        load_pretrained(broken)


def test_tokenizer_must_give_the_trained_special_ids(official):
    from fastardiff_ds.models import check_special_token_ids, load_text_tokenizer

    cfg = load_config(official)
    tok = load_text_tokenizer(cfg.model.text)
    check_special_token_ids(cfg.model.text, tok)
    cfg.model.text.boi_id += 1
    with pytest.raises(ValueError, match="begin_of_image"):
        check_special_token_ids(cfg.model.text, tok)


def test_own_exports_keep_loading(tmp_path):
    bundled = load_pretrained(ROOT / "assets" / "tiny_teacher")
    assert folder_kind(ROOT / "assets" / "tiny_teacher")[0] == "ours" and bundled.cfg.preset == "tiny-bench"
    save_pretrained(tmp_path / "ex", bundled.cfg, bundled.target, bundled.head, meta={"tau": 0.3})
    again = load_pretrained(tmp_path / "ex", overrides=["inference.cfg_scale=3"])
    for a, b in zip(bundled.target.state_dict().values(), again.target.state_dict().values()):
        assert torch.equal(a, b)
    assert again.meta == {"tau": 0.3} and again.cfg.inference.cfg_scale == 3


def test_teacher_folder_sets_the_training_model(official):
    from fastardiff_ds.config import resolve_config
    from fastardiff_ds.models import adopt_teacher_model
    from fastardiff_ds.training.networks import load_teacher_state

    overrides = [f"train.teacher={official}", "model.draft.num_layers=1"]
    cfg = adopt_teacher_model(resolve_config("tiny", overrides=overrides), overrides)
    assert (cfg.model.ar.hidden_size, cfg.model.image.resolution, cfg.data.resolution) == (64, 64, 64)
    assert cfg.model.draft.num_layers == 1  # CLI overrides still win
    state = load_teacher_state(cfg)
    assert "image_head.net.input_proj.weight" in state and "lm_head.weight" not in state


PEAK_SCRIPT = """
import resource, sys, torch
from fastardiff_ds.models import load_pretrained
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
b = load_pretrained(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = sum(p.numel() * p.element_size() for m in (b.target, b.head) for p in m.parameters())
print((after - before) * 1024 / n)
"""


def test_peak_host_memory_is_about_one_copy_in_bf16(tmp_path):
    """A ~110 MB bf16 folder loads with a peak-RSS rise near 1x its size (mmap of one shard on top), not the 2-3x
    of an fp32 build followed by a load. Measured in a fresh process (ru_maxrss is a high-water mark)."""
    import subprocess

    big = write_official(tmp_path / "big", "1.1", num_shards=4,
                         sizes=dict(hidden=1024, layers=4, heads=8, kv_heads=2, inter=2816, head_width=256))
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(big)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    ratio = float(run.stdout.strip().splitlines()[-1])
    assert ratio < 1.6, f"peak RSS rose by {ratio:.2f}x the bf16 weights"


def test_training_init_builds_no_full_target_unless_it_is_trained(official, monkeypatch):
    """At 14B a full target built only to copy the draft from would be a 56 GB fp32 copy on every rank."""
    from fastardiff_ds.models import adopt_teacher_model
    from fastardiff_ds.config import resolve_config
    from fastardiff_ds.training import networks

    cfg = adopt_teacher_model(resolve_config("tiny", overrides=[f"train.teacher={official}"]), [])
    state = networks.load_teacher_state(cfg)
    built = []
    monkeypatch.setattr(networks, "build_target", lambda c: built.append(1) or build_target(c))
    nets = networks.init_networks(cfg, state)
    assert not built and "target" not in nets
    torch.testing.assert_close(nets["draft"].inner.layers[0].mlp.up_proj.weight,
                               state["layers.0.mlp.up_proj.weight"].float())
    cfg.train.target_ar = True
    assert "target" in networks.init_networks(cfg, state) and built
