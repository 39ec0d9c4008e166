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
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402

from masksub import MaskSub, MaskSubError  # noqa: E402
from masksub.integrations.lightning import LightningMaskSub, RNGCheckpoint  # noqa: E402

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
    def __init__(self, manual: bool = False, accumulate: int = 1, mode: str = "mask", random_masks: bool = False,
                 plain: bool = False) -> None:
        super().__init__()
        self.net = net()
        self.automatic_optimization = not manual
        self.accumulate = accumulate
        self.plain = plain  # no MaskSub at all: Lightning's own behaviour
        order = "memory" if manual else "fused"
        kw = {} if mode == "none" else {"ratio": 0.5, **({} if random_masks else {"mask_fn": half_mask})}
        self.masksub = LightningMaskSub(self, self.net, mode=mode, order=order, **kw)
        self.grads: list[dict[str, torch.Tensor]] = []
        self.seen: list[torch.Tensor] = []  # the batches trained on

    def training_step(self, batch, i):
        x, y = batch
        self.seen.append(x)
        if self.plain:
            return F.cross_entropy(self.net(x), y)
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


def trainer(steps, root, callbacks=()):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(root), callbacks=list(callbacks),
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))


def run_and_resume(tmp_path, cut, rng, **lit_kw):
    """An uninterrupted 8-step run (2 epochs of 4 batches) that Lightning checkpoints at step ``cut``,
    and a run resumed from that checkpoint."""
    extra = [RNGCheckpoint()] if rng else []
    whole = Lit(**lit_kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=cut, save_top_k=-1)
    torch.manual_seed(1)  # one mask stream for the run, whatever the tests before did
    trainer(8, tmp_path, [ckpt, *extra]).fit(whole, data_loader())
    resumed = Lit(**lit_kw)
    torch.manual_seed(2)  # a fresh process draws from some other state
    t = trainer(8, tmp_path, extra)
    t.fit(resumed, data_loader(), ckpt_path=str(next((tmp_path / "ckpt").glob(f"*step={cut}.ckpt"))))
    assert t.global_step == 8
    return whole, resumed


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_resume_repeats_every_step_with_random_masks(manual, tmp_path):
    """Checkpoint at the end of epoch 1, resume with RNGCheckpoint: every resumed step has the
    uninterrupted run's gradients, random masks included (their RNG state is in the checkpoint)."""
    whole, resumed = run_and_resume(tmp_path, 4, rng=True, manual=manual, random_masks=True)
    assert len(resumed.grads) == 4
    assert_grads(resumed.grads, whole.grads[4:])


def test_without_rng_checkpoint_the_resumed_masks_differ(tmp_path):
    """Lightning's checkpoint holds no RNG state: the same resume draws other masks."""
    whole, resumed = run_and_resume(tmp_path, 4, rng=False, random_masks=True)
    assert all(torch.equal(a, b) for a, b in zip(resumed.seen, whole.seen[4:], strict=True))  # same batches
    diff = max((r[k] - w[k]).abs().max().item() for r, w in zip(resumed.grads, whole.grads[4:], strict=True) for k in w)
    assert diff > 1e-4, diff


def test_mid_epoch_resume_is_lightnings_own_and_mode_none_matches_plain_lightning(tmp_path):
    """Resumed mid-epoch (step 3 of 4), a plain DataLoader starts the epoch again from its first
    batch: a plain LightningModule does it, and MaskSub in mode none follows it step by step."""
    plain_whole, plain = run_and_resume(tmp_path / "plain", 3, rng=True, plain=True)
    _, none = run_and_resume(tmp_path / "none", 3, rng=True, mode="none")
    assert torch.equal(plain.seen[0], plain_whole.seen[0])  # batch 1 again, where the run had batch 4
    assert not torch.equal(plain.seen[0], plain_whole.seen[3])
    assert_grads(none.grads, plain.grads)
    assert none.masksub.last.loss_sub is None


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
