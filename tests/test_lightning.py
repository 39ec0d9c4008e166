"""LightningMaskSub: automatic (fused) and manual (memory) optimization give the core step's
gradients with the same masks; bf16-mixed, accumulate_grad_batches, checkpoint and resume, and
strategy="ddp" on 2 CPU processes with one all-reduce per step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

pl = pytest.importorskip("pytorch_lightning")

from conftest import tiny_vit  # noqa: E402

from masksub import MaskSub, MaskSubError  # noqa: E402
from masksub.integrations.lightning import LightningMaskSub  # noqa: E402

HERE = Path(__file__).resolve().parent


def half_mask(model, x, ratio):
    """Deterministic mask (left columns zeroed): Lightning, the core step and every process agree."""
    x = x.clone()
    x[..., : int(x.shape[-1] * ratio)] = 0
    return x


def net():
    torch.manual_seed(0)
    return tiny_vit(img_size=32, depth=1)


class Lit(pl.LightningModule):
    def __init__(self, manual: bool = False, accumulate: int = 1) -> None:
        super().__init__()
        self.net = net()
        self.automatic_optimization = not manual
        self.accumulate = accumulate
        order = "memory" if manual else "fused"
        self.masksub = LightningMaskSub(self, self.net, mode="mask", ratio=0.5, mask_fn=half_mask, order=order)
        self.grads: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, i):
        x, y = batch
        if self.automatic_optimization:
            return self.masksub.loss(x, y, F.cross_entropy)
        opt = self.optimizers()
        last = (i + 1) % self.accumulate == 0
        self.masksub.backward(x, y, F.cross_entropy, sync=last, loss_scale=1 / self.accumulate)
        if last:
            opt.step()
            opt.zero_grad()
        return None

    def on_before_optimizer_step(self, optimizer):
        self.grads.append({n: p.grad.detach().float().clone() for n, p in self.net.named_parameters()
                           if p.grad is not None})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data_loader(n=8, batch=2, shuffle=False):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=shuffle)


def fit(lit, steps, tmp_path, **kw):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), **kw)
    trainer.fit(lit, data_loader(), **({"ckpt_path": kw.pop("ckpt", None)} if "ckpt" in kw else {}))
    return trainer


def core_grads(order, micro=1, lr=0.1, steps=1):
    """The core step on the same batches, same masks; SGD steps in between."""
    model = net()
    ms = MaskSub(model, "mask", 0.5, mask_fn=half_mask, order=order)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batches = list(data_loader())
    out = []
    for s in range(steps):
        for k in range(micro):
            x, y = batches[s * micro + k]
            ms.backward(x, y, F.cross_entropy, loss_scale=1 / micro)
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
    return out


def assert_grads(got, want, tol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in w:
            torch.testing.assert_close(g[k], w[k], rtol=tol, atol=tol * 0.1, msg=k)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_gradients_equal_the_core_step(manual, tmp_path):
    lit = Lit(manual=manual)
    fit(lit, 2, tmp_path, enable_checkpointing=False)
    assert_grads(lit.grads, core_grads("memory" if manual else "fused", steps=2))
    assert lit.masksub.last.loss_sub is not None


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_gradient_accumulation(manual, tmp_path):
    lit = Lit(manual=manual, accumulate=2)
    kw = {} if manual else {"accumulate_grad_batches": 2}
    fit(lit, 2, tmp_path, enable_checkpointing=False, **kw)
    assert_grads(lit.grads, core_grads("memory" if manual else "fused", micro=2, steps=2))


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_bf16_mixed_trains_and_logs_both_losses(manual, tmp_path):
    lit = Lit(manual=manual)
    trainer = fit(lit, 2, tmp_path, enable_checkpointing=False, precision="bf16-mixed")
    assert {"loss_main", "loss_sub"} <= set(trainer.logged_metrics)
    assert lit.masksub.last.loss_sub.isfinite() and lit.masksub.last.loss_main.isfinite()
    assert trainer.global_step == 2


def test_checkpoint_and_resume(tmp_path):
    """Stopped at the end of epoch 1 (4 steps), saved by Lightning, resumed: the weights come back
    and the first resumed step has the uninterrupted run's gradient (same masks)."""
    whole = Lit()
    fit(whole, 8, tmp_path / "whole", enable_checkpointing=False)
    first = Lit()
    t = fit(first, 4, tmp_path / "cut", enable_checkpointing=False)
    t.save_checkpoint(tmp_path / "cut.ckpt")
    resumed = Lit()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=8, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.fit(resumed, data_loader(), ckpt_path=str(tmp_path / "cut.ckpt"))
    assert trainer.global_step == 8 and len(resumed.grads) == 4
    assert_grads(resumed.grads[:1], whole.grads[4:5])
    assert all(v.isfinite().all() for v in resumed.state_dict().values())


def test_the_wrong_call_for_the_optimization_mode_is_refused(tmp_path):
    lit = Lit(manual=True)
    x, y = next(iter(data_loader()))
    with pytest.raises(MaskSubError, match="automatic_optimization = False"):
        lit.masksub.loss(x, y, F.cross_entropy)
    with pytest.raises(MaskSubError, match="LightningModule"):
        LightningMaskSub(net())


@pytest.mark.slow
def test_ddp_two_processes_one_all_reduce_per_step(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "counts.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "lightning_worker.py"), str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    c = json.loads(out.read_text())
    for mode in ("automatic", "manual"):
        assert c[mode]["steps"] == 3 and c[mode]["same"], c
        assert c[mode]["allreduces"] == 3, c  # one bucket, one all-reduce per step
