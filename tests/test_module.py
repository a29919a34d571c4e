"""LoRAAdaptationModule under a real Lightning Trainer, on the tiny head (fast, CPU)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from tiny import TinyData, TinyDenoiser, TinyHead, tiny_batch

from lightning_lora.adapters import AdapterSpec
from lightning_lora.callbacks import AdapterCheckpoint, AtomicCheckpointIO
from lightning_lora.errors import UserError
from lightning_lora.module import LoRAAdaptationModule, ScheduleSpec


def _trainer(tmp_path, steps: int, **kwargs) -> pl.Trainer:
    callbacks = [
        AdapterCheckpoint(tmp_path / "adapters", every_n_steps=5),
        pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=5),
    ]
    return pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, plugins=[AtomicCheckpointIO()], num_sanity_val_steps=0, **kwargs,
    )


def _module(**spec) -> LoRAAdaptationModule:
    opt = lambda ps: torch.optim.AdamW(ps, lr=1e-2)  # noqa: E731
    return LoRAAdaptationModule(TinyHead(), AdapterSpec(**{"r": 4, "alpha": 8, **spec}), optimizer=opt)


def test_checkpoint_restores_the_adapter_and_resume_continues(tmp_path) -> None:
    module = _module()
    _trainer(tmp_path, steps=10).fit(module, TinyData())
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)  # its keys: the family matrix (test_families.py)
    assert ckpt["hyper_parameters"]["adapter"]["r"] == 4 and ckpt["hyper_parameters"]["family"] == "tiny"
    assert ckpt["optimizer_states"] and ckpt["global_step"] == 10

    # Restoring at the saved step loads exactly the trained adapter (a fresh module starts from B = 0).
    restored = _module()
    _trainer(tmp_path / "restored", steps=10).fit(restored, TinyData(), ckpt_path=str(last))
    trained = dict(module.named_parameters())
    for name, p in restored.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[name]), name

    # And training continues from there up to the new limit.
    trainer = _trainer(tmp_path / "resumed", steps=15)
    trainer.fit(_module(), TinyData(), ckpt_path=str(last))
    assert trainer.global_step == 15


def test_checkpoint_from_another_adapter_is_refused(tmp_path) -> None:
    _trainer(tmp_path, steps=5).fit(_module(), TinyData())
    other = LoRAAdaptationModule(TinyHead(), AdapterSpec(r=4, alpha=8, targets=["to_q"]))
    with pytest.raises(UserError, match="checkpoint does not fit this adapter configuration"):
        _trainer(tmp_path / "x", steps=6).fit(other, TinyData(), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))


def test_summary_counts_and_submodule_errors() -> None:
    module = _module()
    (count,) = module.parameter_counts()
    base = sum(p.numel() for p in TinyDenoiser().parameters())
    assert count.name == "denoiser" and count.original == base
    assert count.trainable == sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
    lora_b = [n for n in module.trainable_names() if ".lora_B." in n]
    assert len(lora_b) == 10  # 2 blocks x (to_qkv, to_out of self-attention; to_q, to_kv, to_out of cross)
    text = module.adapter_summary()
    assert "Applying LoRA adapters" in text and f"Original params: {base:,}" in text and "LoRA rank: 4" in text
    with pytest.raises(UserError, match=r"'vae' is not adaptable in the tiny head; choose from \['denoiser'\]"):
        _module(submodules=["vae"])
    with pytest.raises(UserError, match="'to_v' matches no module in tiny.denoiser"):
        _module(targets=["to_v"])


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_schedule_warmup_then_shape(name: str) -> None:
    f = ScheduleSpec(name=name, warmup_steps=4).lr_lambda(total_steps=20)
    assert f(0) == pytest.approx(0.2) and f(3) == pytest.approx(0.8) and f(4) == pytest.approx(1.0)
    expected_end = {"constant": 1.0, "linear": 1 / 16, "cosine": 0.5 * (1 + math.cos(15 / 16 * math.pi))}[name]
    assert f(19) == pytest.approx(expected_end)
    with pytest.raises(UserError, match="scheduler.name='step' is unknown"):
        ScheduleSpec(name="step")


def test_single_file_and_directory_reload_into_a_fresh_module(tmp_path) -> None:
    module = _module()
    _trainer(tmp_path, steps=5).fit(module, TinyData())
    path = module.save_adapter_file(tmp_path / "all.safetensors")
    batch = tiny_batch()
    module.eval()
    with torch.no_grad():
        expected = module.head.denoiser(batch["x"], batch["context"])
    for source in (path, tmp_path / "adapters" / "final"):
        fresh = _module().eval()
        fresh.load_adapters(source)
        with torch.no_grad():
            assert torch.equal(fresh.head.denoiser(batch["x"], batch["context"]), expected), source
    r8 = LoRAAdaptationModule(TinyHead(), AdapterSpec(r=8, alpha=16))
    r8_file = r8.save_adapter_file(tmp_path / "r8.safetensors")
    expected_error = r"has shape \(8, 16\) but module 'blocks\.0\.cross_attn\.to_kv' of the model needs \(4, 16\)"
    with pytest.raises(UserError, match=expected_error):
        _module().load_adapters(r8_file)


def test_unique_rows_keeps_each_row_once_in_index_order() -> None:
    from lightning_lora.module import unique_rows

    index = torch.tensor([2, 0, 1, 2, 0])  # e.g. two processes, rows 2 and 0 repeated by the sampler
    emb = torch.tensor([[20.0], [0.0], [10.0], [21.0], [1.0]])
    out = unique_rows({"index": index, "emb": emb})
    assert set(out) == {"emb"} and out["emb"].squeeze(1).tolist() == [0.0, 10.0, 20.0]
    assert unique_rows({"emb": emb})["emb"] is emb


def _lora_tensors(module: LoRAAdaptationModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("source", ["file", "directory"])
def test_init_from_an_adapter_and_train_only_a_subset(tmp_path, source: str) -> None:
    first = _module()
    _trainer(tmp_path / "a", steps=5).fit(first, TinyData())
    path = first.save_adapter_file(tmp_path / "a.safetensors") if source == "file" else tmp_path / "a/adapters/final"
    start = _lora_tensors(first)

    # r/alpha/targets come from the file, whatever the spec says; only cross-attention LoRA trains.
    second = _module(r=16, alpha=3, init_from=str(path), trainable=["cross_attn"])
    assert _lora_tensors(second).keys() == start.keys()
    assert all(torch.equal(v, start[k]) for k, v in _lora_tensors(second).items())
    trainable = second.trainable_names()
    assert trainable and all("cross_attn" in n and "lora_" in n for n in trainable)
    _trainer(tmp_path / "b", steps=5).fit(second, TinyData())
    after = _lora_tensors(second)
    for name, value in after.items():
        if "cross_attn" in name:
            assert not torch.equal(value, start[name]), name  # trained
        else:
            assert torch.equal(value, start[name]), name  # bit-identical
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == trainable


def test_trainable_that_matches_nothing_lists_layer_names(tmp_path) -> None:
    with pytest.raises(UserError) as info:
        _module(trainable=["attn1"])
    msg = str(info.value)
    assert "adapter.trainable=['attn1'] matches no LoRA layer" in msg
    assert "denoiser.blocks.*.cross_attn.to_kv" in msg and "\n" not in msg
    with pytest.raises(UserError, match=r"adapter\.trainable=\[\] is empty"):
        _module(trainable=[])
    with pytest.raises(UserError, match="adapter.init_from: no adapter file or directory at .*missing"):
        _module(init_from=str(tmp_path / "missing"))


def test_gradient_clipping_reaches_the_adapter_gradients():
    """Without FSDP, clipping is Lightning's own: the adapter's gradient norm is capped before each step."""
    module = LoRAAdaptationModule(TinyHead(), {"r": 4, "alpha": 8, "init": "random"})
    norms: list[float] = []
    clip = module.clip_gradients

    def recording(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    module.clip_gradients = recording
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=1e-3)
    trainer.fit(module, TinyData())
    assert len(norms) == 3 and all(n <= 1e-3 * (1 + 1e-4) for n in norms)


class _InOrder(TinyData):
    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.items, batch_size=self.batch_size, shuffle=False)


@pytest.mark.parametrize("accumulate", [1, 2, 4])
def test_accumulating_gradients_equals_one_big_batch(accumulate: int) -> None:
    """accumulate_grad_batches=k over batches of 8/k gives the step of one batch of 8 (the loss is a mean, so
    Lightning's division by k makes the gradients equal); SGD, so the gradient's scale shows in the update."""

    def trained(batch_size: int, k: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        module = LoRAAdaptationModule(TinyHead(), AdapterSpec(r=4, alpha=8, init="random"),
                                      optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5),
                                      scheduler=ScheduleSpec("constant"))
        trainer = pl.Trainer(max_steps=2, accumulate_grad_batches=k, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(module, _InOrder(n=16, batch_size=batch_size))
        assert trainer.global_step == 2
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    reference, accumulated = trained(8, 1), trained(8 // accumulate, accumulate)
    torch.manual_seed(0)
    untrained = {n: p.detach() for n, p in LoRAAdaptationModule(TinyHead(), AdapterSpec(
        r=4, alpha=8, init="random")).named_parameters() if p.requires_grad}
    assert all(not torch.equal(reference[n], untrained[n]) for n in reference)  # the steps moved every tensor
    for name, value in reference.items():
        assert torch.allclose(accumulated[name], value, rtol=1e-5, atol=1e-6), name


class Movable:
    """A batch leaf Lightning moves through its own ``.to(device)`` (not a tensor, not plain data)."""

    def __init__(self) -> None:
        self.moved_to: torch.device | None = None

    def to(self, device: torch.device, **kwargs) -> Movable:
        self.moved_to = device
        return self


def test_batch_transfer_moves_what_lightning_moves() -> None:
    module = LoRAAdaptationModule(TinyHead(), AdapterSpec(r=2, alpha=4))
    meta = torch.device("meta")  # a device other than the batch's, without an accelerator
    flat = {"pixel_values": torch.ones(2, 3), "index": torch.arange(2), "text": ["a", "b"],
            "query": [{"text": None, "image": "x.png"}, {"text": "t", "image": None}], "flag": True}
    out = module.transfer_batch_to_device(flat, meta, 0)
    assert out["pixel_values"].device == meta and out["index"].device == meta and out["index"].dtype == torch.long
    assert {k: out[k] for k in ("text", "query", "flag")} == {k: flat[k] for k in ("text", "query", "flag")}
    # anything else goes through Lightning's walk: a leaf with its own .to, tensors nested in lists, non-dict batches
    leaf = Movable()
    assert module.transfer_batch_to_device({"x": torch.ones(1), "leaf": [leaf]}, meta, 0)["x"].device == meta
    assert leaf.moved_to == meta
    nested = module.transfer_batch_to_device({"negatives": [[torch.ones(1)]]}, meta, 0)
    assert nested["negatives"][0][0].device == meta
    assert module.transfer_batch_to_device([torch.ones(1), "s"], meta, 0)[0].device == meta


class LoggingHead(TinyHead):
    """TinyHead that also reports a value of its own (``train/scaled``), as heads may."""

    def training_step(self, batch):
        out = super().training_step(batch)
        out.logs = {"scaled": 2 * out.loss.detach()}
        return out


def _logged_run(tmp_path, interval: float, callbacks=()) -> tuple[list[dict[str, str]], int, float, list[float]]:
    """A 5-step run logging every 2 steps to CSV: (its rows, self.log calls, the final train/loss, every loss)."""
    import csv

    pl.seed_everything(0)
    module = LoRAAdaptationModule(LoggingHead(), AdapterSpec(r=2, alpha=4, init="random"))
    module.TRAIN_LOG_INTERVAL_S = interval
    calls, losses = [], []
    log = module.log
    module.log = lambda name, value, **kw: (calls.append(name), log(name, value, **kw))  # type: ignore[method-assign]
    step = module.head.training_step
    module.head.training_step = lambda b: (out := step(b), losses.append(float(out.loss.detach())))[0]  # type: ignore
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, log_every_n_steps=2, enable_progress_bar=False,
                         enable_checkpointing=bool(callbacks), enable_model_summary=False, callbacks=list(callbacks),
                         logger=pl.loggers.CSVLogger(tmp_path, name="csv", version=""), limit_val_batches=0)
    trainer.fit(module, TinyData())
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, len(calls), float(trainer.callback_metrics["train/loss"]), losses


def test_train_values_reach_the_loggers_at_their_steps_without_a_log_call_every_step(tmp_path) -> None:
    every, every_calls, _, _ = _logged_run(tmp_path / "every", interval=0.0)  # a log call at every step
    rows, calls, final, losses = _logged_run(tmp_path / "cadence", interval=math.inf)
    assert rows == every and [r["step"] for r in rows] == ["1", "3"]  # after steps 2 and 4
    assert {"train/loss", "train/scaled"} <= set(rows[0])
    assert every_calls == 2 * 5 and calls == 2 * 4  # the first step (nothing logged yet), 2, 4 and the last
    assert final == losses[-1]
    # a callback that monitors a train/* value reads it every step
    monitor = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train/loss", every_n_train_steps=2)
    _, monitored_calls, _, _ = _logged_run(tmp_path / "monitored", interval=math.inf, callbacks=[monitor])
    assert monitored_calls == 2 * 5
    from lightning_lora.module import _reads_train_values

    assert _reads_train_values(pl.callbacks.ModelCheckpoint(filename="{step}-{train/loss:.4f}"))
    assert not _reads_train_values(pl.callbacks.ModelCheckpoint(monitor="val/loss", filename="step_{step:07d}"))
