"""QuickGELU for OpenAI CLIP weights, GELU for open_clip's; forced settings win with a warning."""
from __future__ import annotations

import warnings

import pytest
import torch

from eval_suites.clip_models import load_open_clip
from openai_clip_fixture import tiny_clip, write_checkpoints


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("clip"))


def _uses_quick_gelu(net) -> bool:
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in net.modules())


def _reference(ckpts, state_path, quick: bool):
    """The same weights in a model built by hand with the given activation."""
    from eval_suites.clip_weights import OPENAI_ONLY_KEYS, read_clip_state

    net = tiny_clip(ckpts["config"], quick, seed=123)
    state, _ = read_clip_state(state_path)
    net.load_state_dict({k: v for k, v in state.items() if k not in OPENAI_ONLY_KEYS})
    return net.float().eval()


def _image_features(net, images):
    with torch.no_grad():
        return net.encode_image(images)


@pytest.mark.parametrize("kind", ["openai_jit", "openai_state"])
def test_openai_weights_get_quick_gelu(ckpts, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # auto-detection does not warn
        bundle = load_open_clip(str(ckpts["config"]), ckpts[kind])
    assert _uses_quick_gelu(bundle.model) and bundle.activation.startswith("QuickGELU")
    images = torch.randn(3, 3, 16, 16)
    got = _image_features(bundle.model, images)
    torch.testing.assert_close(got, _image_features(_reference(ckpts, ckpts[kind], True), images))
    wrong = _image_features(_reference(ckpts, ckpts[kind], False), images)
    assert (got - wrong).abs().max() > 1e-2  # the activation matters for these weights


def test_open_clip_weights_keep_gelu(ckpts):
    bundle = load_open_clip(str(ckpts["config"]), ckpts["open_clip"])
    assert not _uses_quick_gelu(bundle.model) and bundle.activation.startswith("GELU")
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(_image_features(bundle.model, images),
                               _image_features(_reference(ckpts, ckpts["open_clip"], False), images))
    tokens = bundle.tokenizer(["a red circle"])
    with torch.no_grad():
        assert bundle.model.encode_text(tokens).shape == (1, 16)


def test_forced_setting_wins_with_a_warning(ckpts):
    with pytest.warns(UserWarning, match="forces GELU although the checkpoint is a TorchScript archive"):
        bundle = load_open_clip(str(ckpts["config"]), ckpts["openai_jit"], activation="gelu")
    assert not _uses_quick_gelu(bundle.model) and "forced" in bundle.activation
    with pytest.warns(UserWarning, match="forces QuickGELU although nothing marks them as OpenAI"):
        bundle = load_open_clip(str(ckpts["config"]), ckpts["open_clip"], activation="quickgelu")
    assert _uses_quick_gelu(bundle.model)
    with warnings.catch_warnings():  # a forced setting that agrees with detection is silent
        warnings.simplefilter("error", UserWarning)
        assert _uses_quick_gelu(load_open_clip(str(ckpts["config"]), ckpts["openai_state"], activation="quickgelu").model)


def test_quickgelu_model_name_forces_quick_gelu(ckpts, tmp_path):
    from openai_clip_fixture import write_config

    config = write_config(tmp_path, "tinyclip-quickgelu")
    with pytest.warns(UserWarning, match="model name tinyclip-quickgelu forces QuickGELU"):
        bundle = load_open_clip(str(config), ckpts["open_clip"])
    assert _uses_quick_gelu(bundle.model)


def test_openai_in_path_and_bad_setting(ckpts, tmp_path):
    import shutil

    hub = tmp_path / "vit_tiny_clip.openai"
    hub.mkdir()
    shutil.copy(ckpts["open_clip"], hub / "open_clip_pytorch_model.bin")
    assert load_open_clip(str(ckpts["config"]), hub / "open_clip_pytorch_model.bin").activation.startswith("QuickGELU")
    with pytest.raises(ValueError, match="--clip-act"):
        load_open_clip(str(ckpts["config"]), ckpts["open_clip"], activation="relu")


def test_scorers_expose_and_record_the_flag(ckpts, tmp_path):
    from eval_suites import clip_score, geneval

    for parser in (clip_score.build_parser(), geneval.build_parser()):
        sub = parser._subparsers._group_actions[0].choices["score"]
        assert "QuickGELU" in sub.format_help()
    from eval_suites.folders import write_prompt_entry
    from PIL import Image

    write_prompt_entry(tmp_path / "gen", 0, {"prompt": "a red circle"}, [Image.new("RGB", (16, 16), "red")])
    res = clip_score.main(["score", "--images", str(tmp_path / "gen"), "--clip-model", str(ckpts["config"]),
                           "--clip-ckpt", str(ckpts["openai_jit"]), "--out", str(tmp_path / "r.json")])
    assert res["protocol"]["clip_activation"].startswith("QuickGELU: the checkpoint is a TorchScript archive")
