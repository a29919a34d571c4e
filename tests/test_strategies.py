"""Strategies: every preset composes, the FSDP policy cuts each family at its blocks, and a 2-process CPU DDP run
of each family's tiny preset writes one adapter with the keys and shapes of a single-process run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO, compose_train, run_cli
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import open_dict
from safetensors import safe_open

from lightning_lora.strategies import FAMILY_BLOCKS, BlockMatcher, block_names
from lightning_lora.train import run

STRATEGIES = sorted(p.stem for p in (REPO / "lightning_lora" / "conf" / "strategy").glob("*.yaml"))

# Each family's tiny preset, cut to a couple of steps without validation, previews or intermediate snapshots.
COMMON = ["trainer.max_steps=2", "trainer.log_every_n_steps=1", "validate_before=false", "validate_after=false",
          "callbacks.adapter_checkpoint.every_n_steps=0", "callbacks.model_checkpoint.every_n_train_steps=2",
          "~callbacks.progress_bar", "~callbacks.sample_previews", "trainer.precision=32-true",
          "adapter.init=random"]
_SET_HERE = {o.lstrip("~").split("=")[0] for o in COMMON}
BERT_FAST = [o for o in FAST if o.lstrip("~").split("=")[0] not in _SET_HERE]
FAMILIES = {
    "bert": lambda bert: [f"model.pretrained={bert}", *BERT_FAST],
    "sd_tiny": lambda _: ["model=sd_tiny", "data=digits", "data.num_images=32", "data.batch_size=4"],
    "trellis_slat_tiny": lambda _: ["model=trellis_slat_tiny", "data=trellis_demo", "data.num_shapes=12",
                                    "data.batch_size=2"],
    "clip_tiny": lambda _: ["model=clip_tiny", "data=digits_retrieval", "data.num_images=48", "data.batch_size=8"],
}


def test_strategy_presets_are_the_documented_ones() -> None:
    assert STRATEGIES == ["ddp", "ddp_spawn", "fsdp", "single", "slurm"]


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_composes_and_builds(name: str, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    with initialize_config_module(config_module="lightning_lora.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"strategy={name}"], return_hydra_config=True)
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


def test_fsdp_yaml_lists_the_same_blocks_as_the_module() -> None:
    cfg = compose_train(["strategy=fsdp"])
    policy = cfg.trainer.strategy.auto_wrap_policy
    assert {k: list(v) for k, v in policy.items() if k != "_target_"} == FAMILY_BLOCKS


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fsdp_policy_puts_every_lora_layer_inside_a_wrapped_block(family, tiny_bert, cache_dir) -> None:
    from lightning_lora.module import LoRAAdaptationModule

    cfg = compose_train([*FAMILIES[family](tiny_bert), f"paths.cache_dir={cache_dir}"])
    module = LoRAAdaptationModule(instantiate(cfg.model), {"r": 2, "alpha": 4})
    matcher = BlockMatcher(block_names())
    blocks = [name for name, m in module.named_modules() if matcher(m)]
    lora_layers = {name.rsplit(".lora_A", 1)[0] for name, _ in module.named_modules() if name.endswith(".lora_A")}
    assert blocks and lora_layers
    outside = [n for n in lora_layers if not any(n.startswith(b + ".") for b in blocks)]
    assert not outside, f"LoRA layers outside any FSDP unit: {outside[:3]}"


def _tensors(run_dir: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Every adapter file a run wrote (snapshots and the family's own formats): relative path -> key -> shape."""
    out = {}
    for path in sorted(run_dir.rglob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out[str(path.relative_to(run_dir))] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_process_cpu_ddp_writes_one_adapter_like_a_single_process_run(family, tmp_path, tiny_bert,
                                                                         cache_dir) -> None:
    overrides = [*FAMILIES[family](tiny_bert), f"paths.cache_dir={cache_dir}", *COMMON, "trainer.accelerator=cpu"]
    cfg = compose_train([*overrides, "strategy=single"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "single")
    run(cfg)  # also builds the tiny model and the demo data in cache_dir before two processes look for them

    ddp_dir = tmp_path / "ddp"
    proc = run_cli([*overrides, "strategy=ddp", "trainer.devices=2", f"hydra.run.dir={ddp_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (ddp_dir / "adapters").iterdir()) == ["final"]  # written once, by rank 0
    single, ddp = _tensors(tmp_path / "single"), _tensors(ddp_dir)
    assert single and ddp == single
    assert not [p for p in ddp_dir.rglob("*") if p.name.startswith(".tmp-")]
    ckpt = torch.load(ddp_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k or "head_parameters" in k for k in ckpt["state_dict"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs CUDA in Lightning")
def test_fsdp_on_one_gpu_writes_the_single_process_adapter(tmp_path, tiny_bert, cache_dir) -> None:
    overrides = [*FAMILIES["bert"](tiny_bert), f"paths.cache_dir={cache_dir}", *COMMON]
    cfg = compose_train([*overrides, "strategy=single", "trainer.accelerator=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "single")
    run(cfg)
    fsdp_dir = tmp_path / "fsdp"
    proc = run_cli([*overrides, "strategy=fsdp", "trainer.gradient_clip_val=null",
                    f"trainer.devices={torch.cuda.device_count()}", f"hydra.run.dir={fsdp_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _tensors(fsdp_dir) == _tensors(tmp_path / "single")
    ckpt = torch.load(fsdp_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
