"""Stage-0 set-up that needs no engine: the export's key split and the refusal of an old-format run folder."""
from __future__ import annotations

import pytest
import torch


def test_split_state_maps_the_engine_keys_onto_target_and_head(tiny_cfg):
    from fastardiff_ds.models import build_head, build_target
    from fastardiff_ds.training.pretrain import build_pretrain_net, split_state

    torch.manual_seed(0)
    net = build_pretrain_net(tiny_cfg)
    state = dict(net.state_dict())
    state.update({n: b for n, b in net.named_buffers()})  # gathered exports carry non-persistent buffers too
    target, head = build_target(tiny_cfg), build_head(tiny_cfg)
    ar_sd, head_sd = split_state(state, target, head)
    target.load_state_dict(ar_sd)  # strict: every key present, none extra
    head.load_state_dict(head_sd)
    assert torch.equal(head.state_dict()[next(iter(head_sd))], net.inner.head.state_dict()[next(iter(head_sd))])


def test_old_single_process_run_folder_is_refused_with_the_way_out(tiny_cfg, tmp_path):
    from fastardiff_ds.engines import Runtime
    from fastardiff_ds.training.pretrain import pretrain_trainer

    (tmp_path / "train_state.pt").write_bytes(b"")
    tiny_cfg.run_dir = str(tmp_path)
    with pytest.raises(FileExistsError, match="old single-process pretrainer.*new run_dir"):
        pretrain_trainer(Runtime(), tiny_cfg, image=None, logger_factory=None)


def test_pretrain_init_starts_from_a_checkpoint_of_the_same_architecture(tiny_cfg, tmp_path):
    from fastardiff_ds.models import build_head, build_target, save_pretrained
    from fastardiff_ds.training.pretrain import init_pretrain_net

    torch.manual_seed(1)
    target, head = build_target(tiny_cfg), build_head(tiny_cfg)
    save_pretrained(tmp_path / "ckpt", tiny_cfg, target, head)
    tiny_cfg.pretrain.init = str(tmp_path / "ckpt")
    torch.manual_seed(0)  # a random init would now differ from the saved (seed 1) weights
    net = init_pretrain_net(tiny_cfg)
    for mine, theirs in ((net.inner.ar, target), (net.inner.head, head)):
        ref = theirs.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in mine.state_dict().items())


def test_pretrain_init_refuses_another_architecture_or_a_missing_folder(tiny_cfg, tmp_path):
    import copy

    from fastardiff_ds.models import build_head, build_target, save_pretrained
    from fastardiff_ds.training.pretrain import init_pretrain_net

    other = copy.deepcopy(tiny_cfg)
    other.model.head.depth += 1
    save_pretrained(tmp_path / "other", other, build_target(other), build_head(other))
    tiny_cfg.pretrain.init = str(tmp_path / "other")
    with pytest.raises(ValueError, match=r"another architecture.*model\.head\.depth"):
        init_pretrain_net(tiny_cfg)
    tiny_cfg.pretrain.init = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="pretrain.init='.*nowhere' holds no model.safetensors"):
        init_pretrain_net(tiny_cfg)
