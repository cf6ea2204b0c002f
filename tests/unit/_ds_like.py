"""engines.Engine over a stand-in for DeepSpeedEngine, for single-process tests of the joint step.

`FakeDS` has the semantics the joint step relies on (checked against real DeepSpeed engines in
tests/unit/test_joint_deepspeed.py): backward(loss) accumulates the gradient of loss / grad_accum; step() is a
no-op inside an accumulation window and at its boundary steps the optimizer, then the LambdaLR, then zeroes the
gradients; non-finite gradients drop the update (DeepSpeed's ZeRO-3 rule, `was_step_applied` False). Every
optimizer step is recorded: the lr of each group and the accumulated gradients it used.
The wrapper is the real `Engine`, so `set_lr_scale`, `lr`, `at_boundary` and `master_params` are the code
under test.
"""
from __future__ import annotations

import torch

from fastardiff_ds.engines.engine import Engine, EngineSpec, scaled_lr_lambda


class FakeDS:
    def __init__(self, module, optimizer, lr_lambda, grad_accum: int):
        self.module, self.optimizer, self.gas, self.micro_steps = module, optimizer, grad_accum, 0
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.applied = False
        self.records = []  # per optimizer step: {"lr": [...], "grads": {name: accumulated grad}}

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss):
        (loss / self.gas).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gas == 0

    def step(self):
        self.applied = False
        if self.is_gradient_accumulation_boundary():
            grads = {n: p.grad.clone() for n, p in self.module.named_parameters() if p.grad is not None}
            self.applied = all(bool(torch.isfinite(g).all()) for g in grads.values())
            if self.applied:  # as DeepSpeed's ZeRO-3: non-finite gradients drop the update (and the lr step)
                self.records.append({"lr": [g["lr"] for g in self.optimizer.param_groups], "grads": grads})
                self.optimizer.step()
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def was_step_applied(self) -> bool:
        return self.applied

    def get_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self):
        return None

    def train(self, mode=True):
        self.module.train(mode)


def fake_engine(name: str, module, lr: float, grad_accum: int = 1, optimizer: str = "sgd",
                betas=(0.9, 0.95)) -> Engine:
    """An Engine with plain SGD (update = -lr * grad, the form Eq. 9 is stated in) or AdamW (no weight decay)."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=lr) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=lr, betas=betas, eps=1e-8, weight_decay=0.0))
    fn, box = scaled_lr_lambda(lambda step: 1.0)
    return Engine(FakeDS(module, opt, fn, grad_accum), EngineSpec(name, lr, schedule="constant"), {}, lr_scale=box)


class Frozen:
    """The teacher / EMA side: a plain module called under no_grad (FrozenEngine without DeepSpeed)."""

    def __init__(self, module):
        self.module = module

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class NoEMA:
    def update(self, decay):
        pass
