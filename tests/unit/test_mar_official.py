"""The MAR family against outputs of the official LTH14/mar code at tiny sizes (tests/fixtures/mar_official.py wrote
tests/fixtures/mar/*.pt with the official modules):
- diffloss_official.pt: DiffLoss's net, single p_sample steps and whole `DiffLoss.sample` runs with every noise draw
  recorded (sampling/diffloss.py replays them draw for draw);
- mar_official.pt: a tiny MAR's state dict (loads strictly) and its encoder and decoder outputs on a fixed mask
  (models/mar.py; written with timm 0.9.12)."""
from pathlib import Path

import pytest
import torch

from fastardiff_ds.models.flow_head import SimpleMLPAdaLN
from fastardiff_ds.models.mar import MAR, MAR_PRESETS, MARConfig
from fastardiff_ds.sampling.diffloss import SpacedCosine, p_step, sample_tokens, space_timesteps

FIXTURES = Path(__file__).parents[1] / "fixtures" / "mar"


@pytest.fixture(scope="module")
def official():
    return torch.load(FIXTURES / "diffloss_official.pt", weights_only=True)


@pytest.fixture(scope="module")
def official_mar():
    return torch.load(FIXTURES / "mar_official.pt", weights_only=True)


def _net(ref) -> SimpleMLPAdaLN:
    s = ref["sizes"]
    net = SimpleMLPAdaLN(s["C"], s["Z"], s["W"], s["D"], mlp_ratio=1.0, out_dim=2 * s["C"])
    state = {k.removeprefix("diffloss.net."): v for k, v in ref["state"].items()}
    net.load_state_dict(state)  # strict: the official key set, nothing missing or extra
    return net.eval().requires_grad_(False)


def _replay(draws):
    it = iter(draws)

    def noise(shape):
        d = next(it)
        assert tuple(d.shape) == tuple(shape), f"draw order differs: official {tuple(d.shape)}, ours {shape}"
        return d.clone()
    return noise


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_process_constants_match_official(official):
    proc = SpacedCosine.make(official["sizes"]["K"])
    assert proc.timestep_map.tolist() == official["timestep_map"].tolist()
    assert torch.allclose(proc.betas, official["betas"].double(), rtol=1e-12, atol=0)
    assert torch.allclose(proc.log_var_min, official["posterior_log_variance_clipped"].double(), rtol=1e-12)


def test_net_forward_matches_official(official):
    f = official["forward"]
    out = _net(official)(f["x"], f["t"], f["z"])
    assert (out - f["out"]).abs().max() < 1e-4 and f["out"].abs().max() > 0.1


def test_one_step_matches_official_p_sample(official):
    """One step from an O(1) state (the full chains below are dominated by x0's blow-up at t = 999)."""
    net, proc = _net(official), SpacedCosine.make(official["sizes"]["K"])
    C = official["sizes"]["C"]
    for st in official["steps"]:
        i, x = st["i"], st["x"]
        out = net(x, proc.timestep_map[i].expand(len(x)), st["z"])
        (noise,) = st["draws"]
        y = p_step(proc, i, x, out[:, :C], out[:, C:], noise, temperature=0.9)
        assert _rel(y, st["out"]) < 1e-5, f"spaced step {i}"
        if i < proc.steps - 1:  # in range below t = 999
            assert (y - st["out"]).abs().max() < 1e-4 and st["out"].abs().max() < 5, f"spaced step {i}"


@pytest.mark.parametrize("case", ["plain", "cfg"])
def test_sample_matches_official_draw_for_draw(official, case):
    ref = official[case]
    proc = SpacedCosine.make(official["sizes"]["K"])
    z = ref["z"]
    ours = sample_tokens(_net(official), z, proc, _replay(ref["draws"]), ref["temperature"], ref["cfg"])
    want = ref["sample"] if ref["cfg"] == 1.0 else ref["sample"][: len(z) // 2]  # official keeps both halves
    assert ours.shape == want.shape
    assert _rel(ours, want) < 1e-4


def test_respacing_rule_and_bad_step_count():
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(10, "3,2") == [0, 2, 4, 5, 9]
    with pytest.raises(ValueError, match="num_sampling_steps"):
        space_timesteps(1000, "2000")


def _ours(ref) -> MAR:
    s = ref["sizes"]
    cfg = MARConfig(img_size=s["img_size"], vae_stride=s["vae_stride"], patch_size=s["patch_size"],
                    vae_embed_dim=s["vae_embed_dim"], enc_dim=s["encoder_embed_dim"], enc_depth=s["encoder_depth"],
                    enc_heads=s["encoder_num_heads"], dec_dim=s["decoder_embed_dim"], dec_depth=s["decoder_depth"],
                    dec_heads=s["decoder_num_heads"], mlp_ratio=s["mlp_ratio"], buffer_size=s["buffer_size"],
                    class_num=s["class_num"], diffloss_d=s["diffloss_d"], diffloss_w=s["diffloss_w"])
    m = MAR(cfg)
    m.load_state_dict(ref["model"])  # strict: exactly the official key set and shapes
    return m.eval().requires_grad_(False)


def test_encoder_decoder_match_official(official_mar):
    m = _ours(official_mar)
    emb = m.class_embedding(official_mar["labels"], len(official_mar["labels"]))
    enc = m.encode(official_mar["tokens"], official_mar["mask"], emb)
    assert (enc - official_mar["encoder_out"]).abs().max() < 1e-4
    z = m.decode(enc, official_mar["mask"])
    assert z.shape == official_mar["z"].shape and (z - official_mar["z"]).abs().max() < 1e-4
    assert official_mar["z"].std() > 0.1


def test_class_labels_outside_class_num_are_refused(official_mar):
    m = _ours(official_mar)
    with pytest.raises(ValueError, match="class_num = 10"):
        m.class_embedding(torch.tensor([10]), 1)
    uncond = m.class_embedding(None, 2)
    assert torch.equal(uncond, m.fake_latent.expand(2, -1))
    dropped = m.class_embedding(torch.tensor([1, 2]), 2, drop=torch.tensor([True, False]))
    assert torch.equal(dropped[0], m.fake_latent[0]) and torch.equal(dropped[1], m.class_emb.weight[2])


@pytest.mark.parametrize("name,params", [("mar-base", 208e6), ("mar-large", 479e6), ("mar-huge", 943e6)])
def test_presets_have_the_official_sizes(name, params):
    with torch.device("meta"):
        m = MAR(MAR_PRESETS[name])
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - params) / params < 0.02, (name, n)


@pytest.mark.parametrize("run", ["plain", "cfg_linear", "cfg_constant"])
def test_masked_generation_matches_official_sample_tokens(official_mar, run):
    """MAR.sample_tokens with a fixed order and its recorded draws: every step's schedule, CFG and head sample."""
    from fastardiff_ds.sampling.mar_loop import mar_generate

    ref = official_mar["sample"][run]
    m = _ours(official_mar)
    proc = SpacedCosine.make(str(official_mar["num_sampling_steps"]))
    toks = mar_generate(m, official_mar["labels"], ref["orders"], proc, _replay(ref["draws"]), ref["num_iter"],
                        ref["cfg"], ref["cfg_schedule"], ref["temperature"])
    assert toks.shape == ref["tokens"].shape
    assert _rel(toks, ref["tokens"]) < 1e-4


def test_masked_generation_refuses_bad_settings(official_mar):
    from fastardiff_ds.sampling.mar_loop import mar_generate, random_orders

    m, proc = _ours(official_mar), SpacedCosine.make("4")
    orders = random_orders(1, m.cfg.seq_len, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="cfg_schedule='cosine'"):
        mar_generate(m, torch.tensor([1]), orders, proc, lambda s: torch.zeros(s), 4, 2.0, "cosine")
    with pytest.raises(ValueError, match="num_iter=17"):
        mar_generate(m, torch.tensor([1]), orders, proc, lambda s: torch.zeros(s), 17)
    with pytest.raises(ValueError, match="class_num"):
        mar_generate(m, torch.tensor([12]), orders, proc, lambda s: torch.zeros(s), 4)


def test_official_checkpoint_file_loads_into_the_model(official_mar, tmp_path):
    """The fixture's weights saved as util/misc.py save_model does, read back through load_mar: same outputs."""
    import argparse

    from fastardiff_ds.models.mar_checkpoint import load_mar

    s = official_mar["sizes"]
    args = argparse.Namespace(model="mar_tiny", img_size=s["img_size"], vae_stride=16, patch_size=1,
                              vae_embed_dim=16, num_sampling_steps="8", buffer_size=s["buffer_size"])
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": official_mar["model"], "model_ema": official_mar["model"], "optimizer": {}, "epoch": 1,
                "scaler": {}, "args": args}, path)
    with pytest.raises(ValueError, match="heads=..."):
        load_mar(path)
    m, steps = load_mar(path, heads=s["encoder_num_heads"])
    assert steps == "8" and m.cfg.enc_depth == 2 and m.cfg.diffloss_d == 2 and m.cfg.buffer_size == 4
    emb = m.class_embedding(official_mar["labels"], 3)
    z = m(official_mar["tokens"], official_mar["mask"], emb)
    assert (z - official_mar["z"]).abs().max() < 1e-4
