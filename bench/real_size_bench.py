"""Real size on the CPU: every real preset at its released size, one LoRA r=16 step vs full fine-tuning.

Each model is built from its published config with random weights (no download), with ``gpu_bench.py``'s
builders and bench heads plus CLIP here, and trained on small inputs:

- ``clip_vit_b32``: transformers' ``CLIPModel`` with ViT-B/32's sizes (151M parameters), 2 captions of 16 token ids
  and 2 images of 224 px, CLIP's symmetric InfoNCE at T=0.01; LoRA on the text tower only, as the ``clip``
  preset's default (``vision: false``; targets q/k/v/out_proj);
- ``sd15``: the SD 1.5 UNet, 256 px batch 1 (4x32x32 latents, 77x768 text context), DDPM epsilon objective;
- ``trellis_slat``: TRELLIS-L structured-latent flow (``conf/model/trellis_slat.yaml``), one item of about 4k
  voxels at 64^3, [1, 1374, 1024] condition tokens;
- ``trellis_ss``: TRELLIS-L sparse-structure flow (``conf/model/trellis_ss.yaml``), one 8x16^3 latent;
- ``qwen3_vl_2b``: Qwen3-VL-2B's sizes (vision tower included), text only, 4 items of 32 tokens (InfoNCE of two
  queries against two documents: the smallest batch whose loss is not identically 0); LoRA in the language model.

Per preset a child process runs LoRA (``LoRAAdaptationModule``, fp32 LoRA weights, AdamW) with the frozen base in
fp32, or created in bf16 where ``--frozen-dtype`` says so (default: bf16 and fp32 for Qwen, fp32 for the rest;
``model.frozen_dtype`` in the SD presets); then another child runs full fine-tuning of the same submodule(s)
(every weight of the UNet, the denoiser, the CLIP text tower, Qwen's language model) in fp32 with AdamW. There is
no autocast: a bf16 frozen base computes in bf16, the LoRA branch in fp32. Gradient checkpointing is off, and for
the TRELLIS models also on (``--checkpointing``): without it their activations dominate the memory.

Per child: the parameters, the trainable parameters, the median seconds of the timed steps (forward + backward +
AdamW step) after the warm-up, up to ``--slow`` seconds of them (a warm-up step that long is the one timed step),
and the peak RSS: the child's ``VmHWM`` (imports, building, every step; not ``ru_maxrss``, which on Linux carries
the parent's resident set across exec). A Markdown table replaces this script's section of ``bench/results.md``
(or of ``--out``).

The machine is never let to swap or OOM-kill: full fine-tuning is not started when its estimate exceeds
``--max-gib`` (default 85% of the RAM), and is recorded as "does not fit (~N GiB needed)". The estimate is the LoRA
run's peak with the weights made fp32, plus 12 bytes (gradient, AdamW's two moments) per trained parameter, and at
least 4 bytes per parameter + 12 per trained parameter. The parent also polls each child's RSS and stops the child
above ``--max-gib``, or when the machine has under 1 GiB available.

    python bench/real_size_bench.py --threads 1                       # every preset: 31 min on a 2-core VM
    python bench/real_size_bench.py --models clip_vit_b32 sd15 --modes lora
    python bench/real_size_bench.py --scale tiny --out /tmp/t.md      # smoke run: tiny models, seconds
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import gpu_bench as gb
import torch
import torch.nn.functional as F
from _results import header, write_section
from torch import nn

from lightning_lora.heads.base import StepOutput, TaskHead

HERE = Path(__file__).resolve().parent
MODELS = ("clip_vit_b32", "sd15", "trellis_slat", "qwen3_vl_2b", "trellis_ss")  # about fastest first
LABELS = {**gb.LABELS, "clip_vit_b32": "CLIP ViT-B/32"}
PRESETS = {"clip_vit_b32": "clip", "sd15": "sd15", "trellis_slat": "trellis_slat", "qwen3_vl_2b": "qwen3_vl_embedding",
           "trellis_ss": "trellis_ss"}
BATCH = {"clip_vit_b32": 2, "sd15": 1, "trellis_slat": 1, "qwen3_vl_2b": 4, "trellis_ss": 1}
FROZEN = {"qwen3_vl_2b": ("bfloat16", "float32")}  # LoRA rows per preset (default: float32 only)
# gradient checkpointing settings per preset (default: off only); TRELLIS's activations dominate its memory
CHECKPOINTING = {"trellis_slat": (False, True), "trellis_ss": (False, True)}
RESULT = "REAL_SIZE_RESULT "
GIB = 2**30

# openai/clip-vit-base-patch32's config.json sizes; a tiny one for smoke runs
CLIP_B32 = dict(
    text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                     bos_token_id=49406, eos_token_id=49407),
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=32, hidden_act="quick_gelu"),
    projection_dim=512, logit_scale_init_value=2.6592,
)
CLIP_TINY = dict(
    text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=77, bos_token_id=998, eos_token_id=999),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                       patch_size=8),
    projection_dim=32,
)


class ClipContrastiveHead(TaskHead):
    """EmbeddingHead's CLIP path on token ids and pixels: text and image features through the towers
    ``ClipEmbedder`` makes (``CLIPTextModelWithProjection``/``CLIPVisionModelWithProjection`` over the
    ``CLIPModel``'s own layers, so module names and the full-fine-tuning set are the preset's), normalised, CLIP's
    symmetric InfoNCE at the preset's temperature. ``ClipEmbedder`` loads a folder (tokenizer, image processor);
    here the model is built in memory and the batch is already token ids and pixel values."""

    family: ClassVar[str] = "embedding"

    def __init__(self, clip: nn.Module, vision: bool = False, temperature: float = 0.01) -> None:
        super().__init__()
        from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        from lightning_lora.models.embedders import CLIP_TARGETS

        text_config, vision_config = copy.deepcopy(clip.config.text_config), copy.deepcopy(clip.config.vision_config)
        text_config.projection_dim = vision_config.projection_dim = clip.config.projection_dim
        with torch.device("meta"):  # empty shells; their parts are the CLIPModel's own
            text = CLIPTextModelWithProjection(text_config)
            image = CLIPVisionModelWithProjection(vision_config)
        text.text_model, text.text_projection = clip.text_model, clip.text_projection
        image.vision_model, image.visual_projection = clip.vision_model, clip.visual_projection
        self.text, self.vision = text, image
        self.targets, self.vision_lora, self.temperature = list(CLIP_TARGETS), vision, temperature

    def adaptable_submodules(self) -> dict[str, nn.Module]:
        return {"text": self.text, "vision": self.vision}

    def default_targets(self) -> dict[str, list[str]]:
        return {"text": self.targets, "vision": self.targets}

    def default_submodules(self) -> list[str]:
        return ["text", "vision"] if self.vision_lora else ["text"]

    def enable_gradient_checkpointing(self) -> None:
        from lightning_lora.models.embedders import checkpoint_activations

        for tower in (self.text, self.vision):
            checkpoint_activations(tower)

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        from lightning_lora.heads.embedding import info_nce

        text = self.text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds
        pixels = batch["pixel_values"].to(next(self.vision.parameters()).dtype)
        image = self.vision(pixel_values=pixels).image_embeds
        text, image = F.normalize(text.float(), dim=-1), F.normalize(image.float(), dim=-1)
        loss = (info_nce(text, image, self.temperature) + info_nce(image, text, self.temperature)) / 2
        return StepOutput(loss, batch_size=text.shape[0])


def build_clip(tiny: bool, batch: int, device: str, length: int = 16) -> tuple[TaskHead, dict[str, Any], str]:
    """CLIP from its config with random weights; captions are <bos> + random tokens + <eos> (the pooled token)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(**(CLIP_TINY if tiny else CLIP_B32))
    with torch.device(device):
        head = ClipContrastiveHead(CLIPModel(config))
    text = config.text_config
    words = torch.randint(0, text.bos_token_id, (batch, length - 2))
    ids = torch.cat([torch.full((batch, 1), text.bos_token_id), words, torch.full((batch, 1), text.eos_token_id)], 1)
    size = config.vision_config.image_size
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device),
              "pixel_values": torch.randn(batch, 3, size, size, device=device)}
    return head, inputs, f"{length} tokens + {size} px image per pair, symmetric InfoNCE"


#: the CPU's small inputs: SD at 256 px (32x32 latents), Qwen's short texts; TRELLIS as in gpu_bench
BUILDERS: dict[str, gb.Builder] = {
    "clip_vit_b32": build_clip,
    "sd15": functools.partial(gb.build_sd15, latent_size=32),
    "trellis_slat": gb.BUILDERS["trellis_slat"],
    "qwen3_vl_2b": functools.partial(gb.build_qwen, length=32),
    "trellis_ss": gb.BUILDERS["trellis_ss"],
}


def frozen_dtypes(model: str, choice: str = "auto") -> tuple[str, ...]:
    """The frozen base's dtypes the LoRA rows of ``model`` use."""
    return FROZEN.get(model, ("float32",)) if choice == "auto" else (choice,)


def checkpointing(model: str, choice: str = "auto") -> tuple[bool, ...]:
    """Gradient checkpointing off, on, or both, for ``model``'s runs."""
    return CHECKPOINTING.get(model, (False,)) if choice == "auto" else {"off": (False,), "on": (True,),
                                                                        "both": (False, True)}[choice]


# ---------------------------------------------------------------------------------------------- memory guard
def meminfo(key: str) -> int:
    """A field of ``/proc/meminfo`` (``MemTotal``, ``MemAvailable``) in bytes."""
    with open("/proc/meminfo", encoding="ascii") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(f"{key}:"))


def full_estimate(lora: dict[str, Any]) -> int:
    """Bytes full fine-tuning needs, from a LoRA run of the same setting: its peak (interpreter, libraries, weights,
    activations) with the weights in fp32, plus a gradient and two AdamW moments (12 B) per trained parameter; at
    least 4 B per parameter + 12 B per trained parameter (weights, gradients and AdamW alone)."""
    frozen = torch.finfo(getattr(torch, lora["frozen_dtype"] or "float32")).bits // 8
    floor = 4 * lora["params"] + 12 * lora["full_trainable"]
    from_lora = int(lora["peak_mib"] * 2**20) + (4 - frozen) * lora["params"] + 12 * lora["full_trainable"]
    return max(floor, from_lora)


def run_child(job: dict[str, Any], limit: int, poll: float = 0.2) -> dict[str, Any]:
    """``run_job`` in a child process whose RSS the parent watches: above ``limit`` bytes, or with under 1 GiB
    left on the machine, the child is stopped and the result says so; a crash is a ``failed`` result."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([sys.executable, __file__, "--job", json.dumps(job)], stdout=out, stderr=err,
                                 text=True)
        stopped, high = None, 0
        while child.poll() is None:
            rss = gb.proc_status_bytes("VmRSS", child.pid) or 0
            high = max(high, rss)
            if rss > limit:
                stopped = f"stopped at {rss / GIB:.1f} GiB RSS (limit {limit / GIB:.1f} GiB)"
            elif meminfo("MemAvailable") < GIB:
                stopped = f"stopped at {rss / GIB:.1f} GiB RSS: the machine had under 1 GiB available"
            if stopped:
                child.kill()
                child.wait()
                break
            time.sleep(poll)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if stopped:
        return {**job, "status": "stopped", "error": stopped, "peak_mib": high / 2**20}
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT)]
    if child.returncode == 0 and lines:
        return json.loads(lines[-1].removeprefix(RESULT))
    return {**job, "status": "failed", "error": stderr[-3000:] or f"exit code {child.returncode}"}


# ---------------------------------------------------------------------------------------------- the runs
def job(args: argparse.Namespace, model: str, mode: str, frozen: str | None, ckpt: bool) -> dict[str, Any]:
    return {"model": model, "mode": mode, "checkpointing": ckpt, "device": "cpu", "scale": args.scale,
            "batch": BATCH[model], "bf16": False, "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
            "frozen_dtype": frozen, "slow": args.slow}


def run_setting(args: argparse.Namespace, model: str, ckpt: bool, limit: int) -> list[dict[str, Any]]:
    """The LoRA rows of one checkpointing setting, each with the full fine-tuning result (run once, or why not)
    under ``full``. Without a LoRA run to estimate from, full fine-tuning runs under the RSS watch alone."""
    loras = [run_child(job(args, model, "lora", dtype, ckpt), limit) if "lora" in args.modes else {}
             for dtype in frozen_dtypes(model, args.frozen_dtype)]
    for r in loras:
        if r and r["status"] != "ok":
            print(f"{model} LoRA {r['status']}: {r['error']}", file=sys.stderr)
    full: dict[str, Any] = {"status": "not run"}
    if "full" in args.modes:
        done = sorted((r for r in loras if r.get("status") == "ok"), key=lambda r: r["frozen_dtype"] != "float32")
        need = full_estimate(done[0]) if done else None
        available = meminfo("MemAvailable")
        if need is not None and need > limit:
            full = {"status": "does not fit", "need": need}
        elif need is not None and need > available - GIB:
            full = {"status": "not run", "need": need, "error": f"{available / GIB:.1f} GiB available at the time"}
        else:
            full = run_child(job(args, model, "full", None, ckpt), limit)
            if full["status"] != "ok":
                print(f"{model} full {full['status']}: {full['error']}", file=sys.stderr)
    base = {"model": model, "checkpointing": ckpt, "full": full}
    return [{**r, **base} for r in loras] if any(loras) else [base]


# ---------------------------------------------------------------------------------------------- report
def gib(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB"


def seconds(r: dict[str, Any]) -> str:
    n = r["timed_steps"]
    return f"{r['s_per_step']:.2f} s ({'1 step' if n == 1 else f'median of {n}'})"


def row(entry: dict[str, Any]) -> str:
    model, full = entry["model"], entry["full"]
    lora_ok = entry.get("status") == "ok"
    ref = entry if lora_ok else full if full.get("status") == "ok" else {}
    params = f"{ref['params']:,}" if ref else ""
    trains = f"{ref['full_trainable']:,}" if ref else ""
    if full.get("status") == "ok":
        full_rss, full_step = gib(full["peak_mib"]), seconds(full)
        ratio = f"{entry['peak_mib'] / full['peak_mib']:.2f}" if lora_ok else ""
    elif full.get("status") == "does not fit":
        full_rss, full_step, ratio = f"does not fit (~{full['need'] / GIB:.1f} GiB needed)", "", ""
    else:
        why = full.get("error", "").splitlines()[-1:] or [""]
        need = f", ~{full['need'] / GIB:.1f} GiB needed" if "need" in full else ""
        full_rss, full_step, ratio = f"{full['status']}{need} {why[0][:80]}".strip(), "", ""
    if lora_ok:
        lora = [entry["inputs"], f"{entry['trainable']:,}", entry["frozen_dtype"] or "float32",
                gib(entry["peak_mib"]), seconds(entry)]
    else:
        status = entry.get("status", "not run")
        lora = ["", "", entry.get("frozen_dtype") or "", f"{status} {entry.get('error', '')[-80:]}".strip(), ""]
    cells = [f"{LABELS[model]} (`{PRESETS[model]}`)", lora[0], f"{BATCH[model]}", params, lora[1], lora[2],
             "on" if entry["checkpointing"] else "off", lora[3], lora[4], trains, full_rss, full_step, ratio]
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def report(entries: list[dict[str, Any]], args: argparse.Namespace, wall: float, load: float) -> str:
    lines = [
        *header("real_size_bench", ["diffusers", "transformers", "peft", "lightning"],
                machine=f"device=cpu torch threads={args.threads or torch.get_num_threads()}"),
        f"wall time: {wall:.0f} s; load average (1 min) {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        "(a shared machine: other processes slow the steps down)",
        "",
        f"Scale {args.scale}, random weights from the released configs (no download). LoRA r={gb.ADAPTER['r']} "
        f"alpha={gb.ADAPTER['alpha']} on the presets' default targets via `LoRAAdaptationModule` (LoRA weights fp32) "
        "vs full fine-tuning of the same submodule(s) in fp32; AdamW, no autocast (a bf16 frozen base computes in "
        "bf16), gradient checkpointing as the grad ckpt column says (on: the head's own). Step = forward + backward + "
        f"AdamW step; {args.warmup} warm-up + median "
        f"of up to {args.steps} steps or {args.slow:.0f} s of them (a warm-up step that long is the one timed step). "
        "Peak RSS = the "
        "child process's VmHWM (interpreter, libraries, building, steps), each configuration in its own child. "
        "Full fine-tuning is not run when its estimate exceeds the memory limit of "
        f"{args.max_gib:.1f} GiB: the LoRA run's peak with fp32 weights + 12 B (gradient, AdamW's two moments) per "
        "trained parameter, at least 4 B x parameters + 12 B x trained parameters.",
        "",
        "| preset | inputs | batch | parameters | trainable at r16 | frozen dtype (LoRA) | grad ckpt | peak RSS LoRA "
        "| LoRA step | full FT trains | peak RSS full FT | full FT step | peak LoRA/full |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    return "\n".join(lines + [row(e) for e in entries]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--modes", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    parser.add_argument("--frozen-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="the frozen base's dtype in the LoRA runs (auto: bf16 and fp32 for Qwen, fp32 for the "
                        "rest; TRELLIS supports fp32 only here)")
    parser.add_argument("--checkpointing", choices=("auto", "off", "on", "both"), default="auto",
                        help="gradient checkpointing (auto: off, and on too for the TRELLIS models)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps at most (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--slow", type=float, default=120.0,
                        help="seconds of timed steps at most; a warm-up step this long is the one timed step")
    parser.add_argument("--scale", choices=("real", "tiny"), default="real", help="tiny: smoke-test in seconds")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per child (0: torch's default); 1 on a shared machine, where OpenMP "
                        "threads waiting for a busy core made small steps up to 40x slower")
    parser.add_argument("--max-gib", type=float, default=None,
                        help="memory limit of one child (default: 85%% of the RAM)")
    parser.add_argument("--out", default=str(HERE / "results.md"), help="file whose real_size_bench section the "
                        "table replaces")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(RESULT + json.dumps(gb.run_job(json.loads(args.job), BUILDERS)), flush=True)
        return 0
    if args.steps < 1 or args.warmup < 0 or args.slow <= 0:
        parser.error("--steps must be >= 1, --warmup >= 0 and --slow > 0")
    if args.frozen_dtype == "bfloat16" and any(m.startswith("trellis") for m in args.models):
        parser.error("--frozen-dtype bfloat16: not for the TRELLIS models (their torso alone is cast); use auto")
    args.max_gib = args.max_gib or 0.85 * meminfo("MemTotal") / GIB
    limit = int(args.max_gib * GIB)
    start, load, entries = time.perf_counter(), os.getloadavg()[0], []
    for model in args.models:
        for ckpt in checkpointing(model, args.checkpointing):
            for entry in run_setting(args, model, ckpt, limit):
                print(row(entry), flush=True)
                entries.append(entry)
    text = report(entries, args, time.perf_counter() - start, load)
    print(text)
    write_section("real_size_bench", text, args.out)
    bad = [e for e in entries if e.get("status") not in ("ok", None) or e["full"].get("status") == "failed"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
