"""Determinism: identical runs give identical bits, with more intra-op threads than cores.

Three identical 30-step ``trellis_slat_tiny`` runs on a loaded 2-core machine once differed by up to 2e-8 in every
adapter tensor. The cause was one kernel: the backward of ``feats[idx]`` with repeated rows (the sparse upsample,
8 fine voxels per coarse one) is an accumulating ``index_put``, which PyTorch runs on CPU with racing float atomics
across threads (deterministic only with one thread or ``torch.use_deterministic_algorithms``), so the order of the
sums, and the last bits, followed thread scheduling. The TRELLIS ops now gather repeated rows with
``gather_rows`` (``index_select`` on CPU: its backward sums in index order).

Every test here runs with more intra-op threads than cores (one thread would hide the race, and on an idle
machine it rarely shows): a structural check that no TRELLIS training step runs an accumulating ``index_put`` over
repeated indices (no luck involved), the gather's backward repeated, and two in-process 30-step runs compared
tensor by tensor and loss by loss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose_train
from families import BY_NAME, FamilyCase, case_fixtures, params
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_lora.adapters import AdapterSpec
from lightning_lora.module import LoRAAdaptationModule
from lightning_lora.train import run

# More intra-op threads than cores (at least 2): the OS preempts them as on a loaded machine, which is when a racing
# kernel shows (with the old gather, two runs here differed from step 4 on; with 2 threads on an idle 2-core
# machine they matched). environment.json records the count a run used.
THREADS = max(2, len(os.sched_getaffinity(0)) + 1) if hasattr(os, "sched_getaffinity") else 3
TRELLIS = ("trellis_ss_tiny", "trellis_slat_tiny")
#: the ops whose accumulation over repeated positions races across CPU threads (PyTorch's own list)
RACING = frozenset({"aten.index_put.default", "aten.index_put_.default", "aten._index_put_impl_.default"})


@pytest.fixture(scope="module", autouse=True)
def threads_over_cores():
    """THREADS intra-op threads for the module (one thread would hide a race)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- the kernels
def _repeats(indices: Any) -> bool:
    """Whether an index (a tensor, or the tuple an ``index_put`` takes) names some position more than once."""
    parts = [i for i in (indices if isinstance(indices, list | tuple) else [indices]) if i is not None]
    if not parts:
        return False
    if parts[0].dtype == torch.bool:  # a mask names each position at most once
        return False
    rows = torch.stack([torch.broadcast_to(p, parts[0].shape).flatten() for p in parts], 1)
    return rows.shape[0] != torch.unique(rows, dim=0).shape[0]


class RacingKernels(TorchDispatchMode):
    """Notes, per op, the calls that would race on a multi-threaded CPU: an accumulating ``index_put``/``put_``
    over repeated positions. Also counts gathers of repeated rows (``index_select``), to show the check saw them."""

    def __init__(self) -> None:
        super().__init__()
        self.racing: list[str] = []
        self.repeated_gathers = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in RACING:
            accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
            if accumulate and _repeats(args[1]):
                self.racing.append(f"{name} over {tuple(args[2].shape)}")
        elif name.startswith("aten.put") and (args[3] if len(args) > 3 else kwargs.get("accumulate", False)):
            self.racing.append(f"{name} over {tuple(args[2].shape)}")
        elif name == "aten.index_select.default" and _repeats(args[2]):
            self.repeated_gathers += 1
        return func(*args, **kwargs)


def _training_batch(case_name: str, request) -> tuple[LoRAAdaptationModule, Any]:
    """A LoRA module on the row's tiny preset and one batch of its demo data (real voxelised shapes: neighbouring
    voxels share coarse voxels, so the upsample really repeats rows)."""
    case = BY_NAME[case_name]
    cfg = compose_train([*case.run_overrides(case_fixtures(case, request)), "adapter.init=random",
                         "trainer.precision=32-true"])
    torch.manual_seed(0)
    data = instantiate(cfg.data)
    data.setup("fit")
    module = LoRAAdaptationModule(instantiate(cfg.model), AdapterSpec.from_config(cfg.adapter))
    return module, next(iter(data.train_dataloader()))


@pytest.mark.parametrize("case_name", TRELLIS)
def test_a_trellis_training_step_runs_no_racing_kernel(case_name: str, request) -> None:
    module, batch = _training_batch(case_name, request)
    with RacingKernels() as seen:
        module.head.training_step(batch).loss.backward()
    assert not seen.racing, f"{case_name}: kernels whose sums race across threads: {seen.racing}"
    if case_name == "trellis_slat_tiny":  # the sparse upsample gathered repeated rows, the fixed-order way
        assert seen.repeated_gathers > 0


@pytest.mark.parametrize("case", params(slow=lambda case: True, where=lambda case: case.family != "flow3d"))
def test_no_other_family_runs_a_racing_kernel(case: FamilyCase, request) -> None:
    """The same check over the other rows of the family matrix, on each row's own batch (slow: builds every base;
    none ran one when this was written)."""
    fixtures = case_fixtures(case, request)
    torch.manual_seed(0)
    module = LoRAAdaptationModule(instantiate(case.compose(fixtures).model),
                                  AdapterSpec(r=4, alpha=8, dropout=0.0, init="random"))
    with RacingKernels() as seen:
        module.head.training_step(case.batch(fixtures)).loss.backward()
    assert not seen.racing, f"{case.name}: kernels whose sums race across threads: {seen.racing}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_rows_backward_sums_repeats_in_a_fixed_order(dtype: torch.dtype) -> None:
    """Big enough for PyTorch's parallel path (>= 32768 elements); ``source[index]``'s backward differed in most
    of 29 repeats here, float32 (measured on the 2-core machine)."""
    from lightning_lora.models.trellis.sparse import gather_rows

    g = torch.Generator().manual_seed(0)
    source = torch.randn(3000, 128, generator=g).to(dtype).requires_grad_()
    index = torch.randint(0, 3000, (24000,), generator=g)
    upstream = torch.randn(24000, 128, generator=g).to(dtype)
    assert torch.equal(gather_rows(source, index), source[index])
    grads = []
    for _ in range(20):
        source.grad = None
        gather_rows(source, index).backward(upstream)
        grads.append(source.grad.clone())
    assert all(torch.equal(grad, grads[0]) for grad in grads[1:])
    expected = torch.zeros(3000, 128, dtype=torch.float64).index_add(0, index, upstream.double())
    torch.testing.assert_close(grads[0].double(), expected, rtol=0.02 if dtype == torch.bfloat16 else 1e-5,
                               atol=0.05 if dtype == torch.bfloat16 else 1e-4)


# ---------------------------------------------------------------------------- two identical 30-step runs
class StepLosses(Callback):
    """The training loss of every step, as the module returned it (bits, not a logger's rounding)."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach().clone())


STEPS = 30
RUN = [f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1", "validate_before=false", "validate_after=false",
       "callbacks.adapter_checkpoint.every_n_steps=10", f"callbacks.model_checkpoint.every_n_train_steps={STEPS}",
       "~callbacks.progress_bar", "~callbacks.sample_previews", "trainer.precision=32-true",
       "+callbacks.step_losses._target_=test_determinism.StepLosses"]


def _train(case_name: str, run_dir: Path, request) -> list[torch.Tensor]:
    case = BY_NAME[case_name]
    cfg = compose_train([*case.run_overrides(case_fixtures(case, request)), *RUN])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    metrics, objects = run(cfg)
    assert metrics["global_step"] == STEPS
    return next(cb for cb in objects["trainer"].callbacks if isinstance(cb, StepLosses)).losses


def _every_tensor(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every adapter tensor a run wrote: snapshots, final, the family's lora_ckpts, keyed by file and name."""
    found = {f"{path.relative_to(run_dir)}:{key}": value
             for path in sorted(run_dir.rglob("*.safetensors")) for key, value in load_file(path).items()}
    assert found
    return found


def test_identical_30_step_slat_runs_are_bit_identical(tmp_path, request) -> None:
    first = _train("trellis_slat_tiny", tmp_path / "a", request)
    second = _train("trellis_slat_tiny", tmp_path / "b", request)
    assert len(first) == len(second) == STEPS
    differing = [step for step, (x, y) in enumerate(zip(first, second, strict=True), 1) if not torch.equal(x, y)]
    assert not differing, f"training losses differ from step {differing[0]} on"
    a, b = _every_tensor(tmp_path / "a"), _every_tensor(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 3 * 20  # 3 snapshots + final + lora_ckpts, 20 LoRA tensors each
    differing_tensors = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differing_tensors, f"{len(differing_tensors)} adapter tensors differ, e.g. {differing_tensors[0]}"
    recorded = json.loads((tmp_path / "a" / "environment.json").read_text())["torch_threads"]
    assert recorded == THREADS
