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
