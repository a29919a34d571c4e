"""Stable Diffusion family numbers, in ``bench/results.md`` (this script's section, replaced on each run).

1. Adapter file sizes per format (PEFT dir, diffusers, kohya) at r=4 and r=32 for the real SD 1.5 layout: the
   UNet (and CLIP ViT-L text encoder) are built from their published configs on the meta device, LoRA is put in
   with PEFT, and the files are written from zero tensors of the adapter's shapes (no weights needed).
2. Seconds per training step of ``model=sd_tiny`` on ``data=digits``-like batches under the Lightning Trainer,
   with and without latent caching (median of steps after warm-up).

    python bench/sd_bench.py            # both
    python bench/sd_bench.py --sizes    # only the file sizes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _results import header, write_section

HERE = Path(__file__).resolve().parent
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77)


def _meta_sd15():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET), CLIPTextModel(CLIPTextConfig(**SD15_TEXT))


def _file_sizes(rank: int, text_encoder: bool) -> dict[str, int]:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from lightning_lora.adapters.factors import Factors
    from lightning_lora.adapters.formats import write_diffusers, write_kohya, write_peft_dir
    from lightning_lora.fileio import path_bytes
    from lightning_lora.heads.diffusion import TEXT_ENCODER_TARGETS, UNET_TARGETS, canonical_name

    unet, te = _meta_sd15()
    parts = {"unet": (unet, UNET_TARGETS)} | ({"text_encoder": (te, TEXT_ENCODER_TARGETS)} if text_encoder else {})
    modules, base_params = {}, 0
    for sub, (model, targets) in parts.items():
        base_params += sum(p.numel() for p in model.parameters())
        peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
        state = get_peft_model_state_dict(peft)
        for key, value in state.items():
            if ".lora_A." in key:
                name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                up = state[key.replace(".lora_A.", ".lora_B.")]
                modules[canonical_name(f"{sub}.{name}")] = Factors(down=torch.zeros(value.shape),
                                                                   up=torch.zeros(up.shape), scale=1.0)
    params = sum(f.down.numel() + f.up.numel() for f in modules.values())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        unet_only = {k.removeprefix("unet."): f for k, f in modules.items() if k.startswith("unet.")}
        sizes = {
            "params": params,
            "base_params": base_params,
            "peft_unet_fp32": path_bytes(write_peft_dir(tmp / "peft", unet_only)),
            "diffusers_fp32": path_bytes(write_diffusers(tmp / "d.safetensors", modules)),
            "diffusers_fp16": path_bytes(write_diffusers(tmp / "d16.safetensors", modules, dtype=torch.float16)),
            "kohya_fp16": path_bytes(write_kohya(tmp / "k16.safetensors", modules, dtype=torch.float16)),
        }
    return sizes


def bench_sizes() -> list[str]:
    lines = ["| layout | rank | LoRA params | PEFT dir (UNet, fp32) | diffusers fp32 | diffusers fp16 | kohya fp16 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    mib = 1024 * 1024
    for text_encoder in (False, True):
        for rank in (4, 32):
            s = _file_sizes(rank, text_encoder)
            layout = "UNet + text encoder" if text_encoder else "UNet attention (to_q/k/v/out.0)"
            lines.append(f"| {layout} | {rank} | {s['params']:,} | {s['peft_unet_fp32'] / mib:.2f} MiB | "
                         f"{s['diffusers_fp32'] / mib:.2f} MiB | {s['diffusers_fp16'] / mib:.2f} MiB | "
                         f"{s['kohya_fp16'] / mib:.2f} MiB |")
    return lines


def bench_steps(steps: int) -> list[str]:
    import lightning.pytorch as pl

    from lightning_lora.heads.diffusion import DiffusionHead
    from lightning_lora.models.sd_tiny import ensure_tiny_sd
    from lightning_lora.module import LoRAAdaptationModule

    class Timer(pl.Callback):
        def __init__(self):
            self.times, self._t = [], 0.0

        def on_train_batch_start(self, *args):
            self._t = time.perf_counter()

        def on_train_batch_end(self, *args):
            self.times.append(time.perf_counter() - self._t)

    folder = ensure_tiny_sd(Path(tempfile.gettempdir()) / "lightning_lora_bench_sd_tiny")
    g = torch.Generator().manual_seed(0)
    rows = [{"pixel_values": torch.rand(3, 32, 32, generator=g) * 2 - 1, "text": f"a handwritten digit {i % 10}",
             "index": i} for i in range(64)]

    def collate(items):
        return {"pixel_values": torch.stack([r["pixel_values"] for r in items]), "text": [r["text"] for r in items],
                "index": torch.tensor([r["index"] for r in items])}

    lines = ["| caching | precision | batch | s/step (median) | steps/s |", "| --- | --- | --- | --- | --- |"]
    for cache in (False, True):
        for precision in ("32-true", "bf16-mixed"):
            torch.manual_seed(0)
            head = DiffusionHead(folder, resolution=32, cache_latents=cache, cache_text_embeddings=cache)
            module = LoRAAdaptationModule(head, {"r": 4, "alpha": 4, "init": "gaussian"},
                                          scheduler={"name": "constant"})
            timer = Timer()
            trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, callbacks=[timer], precision=precision)
            loader = torch.utils.data.DataLoader(rows, batch_size=8, shuffle=True, collate_fn=collate)
            trainer.fit(module, loader)
            median = statistics.median(timer.times[8:])  # one epoch = 8 steps fills the caches
            lines.append(f"| {'latents + text' if cache else 'none'} | {precision} | 8 | {median:.4f} | "
                         f"{1 / median:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", action="store_true", help="only the file sizes")
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()
    head = [*header("sd_bench", ["diffusers", "peft"], machine=f"torch threads={torch.get_num_threads()} device=cpu"),
            "", "Adapter files for the real SD 1.5 layout (meta-device UNet + CLIP ViT-L/14 text encoder):", ""]
    body = bench_sizes()
    if not args.sizes:
        title = "Training step of model=sd_tiny (UNet 32/64, 32 px, batch 8) under the Lightning Trainer on CPU:"
        body += ["", title, "", *bench_steps(args.steps)]
    text = "\n".join(head + body) + "\n"
    print(text)
    write_section("sd_bench", text)


if __name__ == "__main__":
    sys.exit(main())
