"""Optimisation shared by the stages: the EMA (floats averaged with IP2P's warmup, integer buffers
copied; the stages' own and Lightning's callback) and the learning-rate schedule."""

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lit_restore.config import load_config
from lit_restore.fit import build_callbacks, build_stage
from lit_restore.stages.base import make_ema, warmup_cosine
from _batches import ROOT


class WithTokenIds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("ids", torch.arange(49408))  # a CLIP vocabulary's worth of token ids


def _step(model: nn.Module) -> None:
    with torch.no_grad():
        model.linear.weight.add_(1.0)


def test_stage_ema_copies_integer_buffers():
    model = WithTokenIds()
    ema = make_ema(model, 0.9999)
    for _ in range(3):
        _step(model)
        ema.update_parameters(model)
    assert torch.equal(ema.module.ids, model.ids)
    assert not torch.equal(ema.module.linear.weight, model.linear.weight)


def test_lightning_ema_callback_copies_integer_buffers():
    cfg = load_config(ROOT / "configs/tiny/biqa.yaml", ["optim.ema_decay=0.9999"])
    (callback,) = [c for c in build_callbacks(cfg, build_stage(cfg)) if type(c).__name__ == "WeightAveraging"]
    model = WithTokenIds()
    # What the callback builds in its setup: an AveragedModel with its own averaging arguments.
    ema = AveragedModel(model, use_buffers=True, **callback._kwargs)
    for _ in range(3):
        _step(model)
        ema.update_parameters(model)
    assert torch.equal(ema.module.ids, model.ids)


def test_ema_warmup_follows_instructpix2pix():
    model = WithTokenIds()
    start = model.linear.weight.detach().clone()
    warm, fixed = make_ema(model, 0.9999, warmup=True), make_ema(model, 0.9999, warmup=False)
    for ema in (warm, fixed):
        ema.update_parameters(model)  # the first update copies
    _step(model)
    warm.update_parameters(model)
    fixed.update_parameters(model)
    # At the first averaging update the decay is (1 + 1) / (10 + 1).
    assert torch.allclose(warm.module.linear.weight, start + (1 - 2 / 11), atol=1e-6)
    assert torch.allclose(fixed.module.linear.weight, start + 1e-4, atol=1e-6)


def test_schedule_holds_then_decays_as_irconstyle():
    """IRConStyle: 3e-4 for 243312 iterations, then a cosine to 1e-6 over 460320 (no warmup)."""
    cfg = load_config(ROOT / "configs/restorer.yaml").optim

    def lr(step: int) -> float:
        return cfg.lr * warmup_cosine(step, cfg.warmup_steps, 703632, cfg.min_lr_ratio, cfg.hold_steps)

    assert lr(0) == lr(243312) == 3e-4
    assert abs(lr(243312 + 460320 // 2) - (1e-6 + 3e-4) / 2) < 2e-7
    assert abs(lr(703632) - 1e-6) < 1e-10
    assert warmup_cosine(4, 10, 100, 0.0, hold_steps=20) == 0.5  # warmup first, as before


def _schedule_after(saved_total: int, new_total: int, step: int, legacy: bool = False):
    """LRs of a schedule trained for `saved_total` steps and checkpointed at `step`, then resumed
    with `new_total`: (the LR it had at `step`, the resumed scheduler's LRs from `step` on)."""
    from types import SimpleNamespace

    stage = build_stage(load_config(ROOT / "configs/tiny/restorer.yaml", ["model.constyle_mode=joint",
                                                                          "optim.warmup_steps=2"]))
    stage._trainer = SimpleNamespace(max_steps=saved_total)
    first = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0),
                                              stage.lr_schedule())
    for _ in range(step):
        first.optimizer.step()
        first.step()
    state = first.state_dict()
    if legacy:  # made before LRSchedule: a function saved no fields, the run's length is in its config
        state["lr_lambdas"] = [{}]
    ckpt = {"global_step": step, "lr_schedulers": [state],
            "hyper_parameters": {"config": {"trainer": {"max_steps": saved_total}}}}
    stage._trainer = SimpleNamespace(max_steps=new_total)
    stage._extend_schedule(ckpt)
    resumed = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0),
                                                stage.lr_schedule())
    resumed.load_state_dict(ckpt["lr_schedulers"][0])
    lrs = []
    for _ in range(step, new_total + 1):
        lrs.append(resumed.get_last_lr()[0])
        resumed.optimizer.step()
        resumed.step()
    return first.get_last_lr()[0], lrs


def test_a_run_extended_on_resume_goes_on_from_its_lr_without_a_jump():
    min_ratio = load_config(ROOT / "configs/tiny/restorer.yaml", []).optim.min_lr_ratio
    for legacy in (False, True):
        before, after = _schedule_after(30, 60, 15, legacy=legacy)
        assert after[0] == before  # the step it resumes at keeps its LR
        assert all(b <= a for a, b in zip(after, after[1:]))  # then only decays ...
        assert after[-1] == min_ratio  # ... to the floor at the new end
        assert 0.45 < after[22] / before < 0.65  # halfway through the new stretch
    unchanged_before, unchanged = _schedule_after(30, 30, 15)
    assert unchanged[0] == unchanged_before and unchanged[-1] == min_ratio
