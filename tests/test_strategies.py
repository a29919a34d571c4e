"""Strategies: every preset composes (after trainer/default, under command-line overrides), the FSDP preset lists
the module's blocks, and under 2-process CPU FSDP the adapter snapshot and the previews see whole tensors. The
per-family checks (the FSDP policy cuts each family at its blocks; a 2-process CPU DDP run writes the files of a
single-process run) run over the family matrix in test_families.py."""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, compose_train, run_cli
from families import BY_NAME, RUN
from helpers import adapter_file_shapes
from hydra.utils import instantiate
from omegaconf import open_dict
from safetensors.torch import load_file

from lightning_lora.config import compose_config
from lightning_lora.strategies import block_names
from lightning_lora.train import run

#: the blocks of the package's heads (TaskHead.fsdp_blocks): transformer layers of BERT, CLIP and Qwen3-VL, the
#: diffusers UNet's attention and residual blocks, TRELLIS's cross-attention and sparse residual blocks
PACKAGE_BLOCKS = {"BertLayer", "CLIPEncoderLayer", "Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock",
                  "BasicTransformerBlock", "ResnetBlock2D", "ModulatedTransformerCrossBlock",
                  "ModulatedSparseTransformerCrossBlock", "SparseResBlock3d"}
STRATEGIES = sorted(p.stem for p in (REPO / "conf" / "strategy").glob("*.yaml"))


def test_strategy_presets_are_the_documented_ones() -> None:
    assert STRATEGIES == ["ddp", "ddp_spawn", "fsdp", "single", "slurm"]


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_composes_and_builds(name: str, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    cfg = compose_config([f"strategy={name}"], return_hydra_config=True)
    trainer = cfg.trainer
    strategy = trainer.strategy if isinstance(trainer.strategy, str) else instantiate(trainer.strategy)
    assert isinstance(trainer.num_nodes, int)
    if name == "single":
        assert (strategy, trainer.devices) == ("auto", 1)
    elif name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        assert isinstance(strategy, FSDPStrategy)
        assert strategy.kwargs["use_orig_params"] is True and strategy._state_dict_type == "full"
        assert strategy.kwargs["auto_wrap_policy"]._lambda_fn.names == block_names()
    elif name == "slurm":
        from lightning.fabric.plugins.environments import SLURMEnvironment

        assert isinstance(strategy.cluster_environment, SLURMEnvironment) and strategy.cluster_environment.auto_requeue
        assert (trainer.devices, trainer.num_nodes) == (4, 2)
        assert cfg.hydra.run.dir == "outputs/slurm/1234"  # every task and every requeue share one run dir
    else:
        from lightning.pytorch.strategies import DDPStrategy

        assert isinstance(strategy, DDPStrategy) and trainer.num_nodes == 1
        assert strategy._start_method == ("spawn" if name == "ddp_spawn" else "popen")


def test_a_strategy_file_overrides_trainer_default_and_the_command_line_overrides_both(tmp_path) -> None:
    # No shipped preset sets a key of trainer/default.yaml yet, so a user's preset on the search path shows it.
    (tmp_path / "strategy").mkdir()
    (tmp_path / "strategy" / "pinned.yaml").write_text(
        "# @package trainer\nstrategy: auto\ndevices: 1\nprecision: 32-true\ngradient_clip_val: 0.5\n")
    search = f"hydra.searchpath=[file://{tmp_path}]"
    default = compose_train()
    assert (default.trainer.precision, default.trainer.gradient_clip_val) == ("bf16-mixed", 1.0)

    pinned = compose_train([search, "strategy=pinned"]).trainer
    assert (pinned.precision, pinned.gradient_clip_val) == ("32-true", 0.5)

    overridden = compose_train([search, "strategy=pinned", "trainer.gradient_clip_val=2.0", "trainer.devices=3"])
    assert (overridden.trainer.precision, overridden.trainer.gradient_clip_val) == ("32-true", 2.0)
    assert overridden.trainer.devices == 3
    assert compose_train(["strategy=ddp", "trainer.devices=2"]).trainer.devices == 2


def test_fsdp_policy_takes_every_heads_blocks_unless_the_config_names_them() -> None:
    cfg = compose_train(["strategy=fsdp"])
    assert cfg.trainer.strategy.auto_wrap_policy.blocks is None  # the heads' own lists, not a copy in the yaml
    names = instantiate(cfg.trainer.strategy.auto_wrap_policy)._lambda_fn.names
    assert names >= PACKAGE_BLOCKS and names == block_names()
    chosen = compose_train(["strategy=fsdp", "trainer.strategy.auto_wrap_policy.blocks=[BertLayer]"])
    assert instantiate(chosen.trainer.strategy.auto_wrap_policy)._lambda_fn.names == {"BertLayer"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs CUDA in Lightning")
def test_fsdp_on_one_gpu_writes_the_single_process_adapter(tmp_path, tiny_bert, cache_dir) -> None:
    bert = BY_NAME["bert"]
    overrides = [*bert.run_overrides({"tiny_bert": tiny_bert, "cache_dir": cache_dir}), *RUN, "adapter.init=random"]
    cfg = compose_train([*overrides, "strategy=single", "trainer.accelerator=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "single")
    run(cfg)
    fsdp_dir = tmp_path / "fsdp"
    proc = run_cli([*overrides, "strategy=fsdp", f"trainer.devices={torch.cuda.device_count()}",
                    f"hydra.run.dir={fsdp_dir}"])  # norm clipping on (trainer/default): FSDP's clip_grad_norm_
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert adapter_file_shapes(fsdp_dir) == adapter_file_shapes(tmp_path / "single")
    ckpt = torch.load(fsdp_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])


# ---------------------------------------------------------------- FSDP on CPU (gloo): adapters and previews whole
def _preview_head_class():
    from tiny import TinyHead, tiny_batch

    class PreviewHead(TinyHead):
        """The tiny head with a picture: the denoiser's output on a fixed batch as 2 images of 4x4."""

        def preview_images(self) -> torch.Tensor:
            batch = tiny_batch(n=2, seq=16, seed=3)
            out = self.denoiser(batch["x"], batch["context"])[..., :3]  # [2, 16, 3]
            return torch.sigmoid(out).transpose(1, 2).reshape(1, 2, 3, 4, 4)

    return PreviewHead


def _lora_module():
    from lightning_lora.module import LoRAAdaptationModule

    module = LoRAAdaptationModule(_preview_head_class()(seed=0), {"r": 2, "alpha": 4, "init": "random"})
    return module.eval()  # no dropout, so both copies compute the same


def _whole_names(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n.replace("_fsdp_wrapped_module.", ""): p for n, p in module.named_parameters() if "lora_" in n}


def _png(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        return torch.tensor(list(image.getdata()), dtype=torch.int16)


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: the tiny head sharded FULL_SHARD at its attention blocks, beside a whole copy."""
    import torch.distributed as dist
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    from lightning_lora.callbacks import AdapterCheckpoint, SamplePreviews
    from lightning_lora.callbacks.sample_previews import image_grid, png_bytes
    from lightning_lora.strategies import block_wrap_policy, full_params

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        out_dir, reference, module = Path(out), _lora_module(), _lora_module()
        whole = {n: p.detach().clone() for n, p in _whole_names(reference).items()}
        root = FullyShardedDataParallel(module, auto_wrap_policy=block_wrap_policy(["Attention"]),
                                        sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=True,
                                        device_id=torch.device("cpu"))
        strategy = FSDPStrategy()
        strategy.model = root
        trainer = SimpleNamespace(strategy=strategy, is_global_zero=rank == 0, global_step=3, logger=None, loggers=[],
                                  callbacks=[])

        # Previews first: the root's lazy init happens inside full_params, before any forward of the root.
        previews = SamplePreviews(out_dir / "samples", every_n_steps=1)
        previews._draw(trainer, module, "base", 0, disable_adapters=True)
        previews._draw(trainer, module, "step_0000003", 3)

        sharded = {n: tuple(p.shape) for n, p in _whole_names(module).items()}
        assert sharded.keys() == whole.keys()
        with full_params(trainer, module):
            seen = {n: p.detach().clone() for n, p in _whole_names(module).items()}
        snapshots = AdapterCheckpoint(out_dir / "fsdp")
        snapshots._write(trainer, module, "final")

        if rank == 0:
            assert any(shape != whole[n].shape for n, shape in sharded.items()), "nothing was sharded on rank 0"
            assert {n: t.shape for n, t in seen.items()} == {n: t.shape for n, t in whole.items()}
            assert all(torch.equal(seen[n], whole[n]) for n in whole)
            assert snapshots.last_written == out_dir / "fsdp" / "final"
            reference.save_adapters(out_dir / "single" / "final", step=3)
            with reference.adapters["denoiser"].disable_adapter():
                base = reference.head.preview_images()
            for name, images in (("base", base), ("step_0000003", reference.head.preview_images())):
                (out_dir / f"expected_{name}.png").write_bytes(png_bytes(image_grid(images)))
        else:
            assert snapshots.last_written is None and not previews.written
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_fsdp_full_shard_writes_whole_adapters_and_previews(tmp_path) -> None:
    """FULL_SHARD over 2 gloo processes: rank 0 alone holds a shard of each LoRA tensor, yet the adapter snapshot
    and the previews it writes equal those of the unsharded model (every rank joins the gather)."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    for name in ("base", "step_0000003"):
        diff = (_png(tmp_path / "samples" / f"{name}.png") - _png(tmp_path / f"expected_{name}.png")).abs().max()
        assert diff <= 1, name  # one PNG level at most: the same numbers, summed over gathered shards
    single = sorted(p.relative_to(tmp_path / "single") for p in (tmp_path / "single").rglob("*") if p.is_file())
    fsdp = sorted(p.relative_to(tmp_path / "fsdp") for p in (tmp_path / "fsdp").rglob("*") if p.is_file())
    assert single and fsdp == single
    for rel in (p for p in single if p.suffix == ".safetensors"):
        want, got = load_file(tmp_path / "single" / rel), load_file(tmp_path / "fsdp" / rel)
        assert want and want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), rel
