"""Seed 002 (the diffusers + PEFT Stable Diffusion tutorial) run against this project, on the tiny SD folder.

One short ``model=sd15`` run (the seed's recipe: r = alpha = 4, gaussian init, UNet targets to_q/to_k/to_v/to_out.0,
text-encoder LoRA on q_proj/v_proj as its section 6C) with the pretrained id replaced by the tiny diffusers folder
(``DiffusionHead.build_tiny``); then the seed's own code blocks, each below in a ``seed_*`` function as the seed
writes it, with only its names filled: ``model_id``/``MODEL_ID`` = the tiny folder, its file paths = this run's
files, ``"cuda"`` = ``"cuda"`` when there is one, else ``"cpu"`` (the seed's complete example's own line). Every
block's UNet (and text-encoder) outputs are compared with the trained module's (max abs difference), and the
adapter weights must act as stated (weight 0 = the base model's output). The fp16 blocks run on the CPU too.

Seed blocks and where they run:
- 2A load the UNet in fp16 and freeze it, 2B ``LoraConfig`` + ``unet.add_adapter``, 2C count the trainable
  parameters: ``test_seed_lora_setup_is_our_adapter`` (and the seed's printed numbers on the SD 1.5 architecture:
  ``test_seed_expected_counts_on_the_sd15_architecture``);
- 4 optimizer + ``get_scheduler``: ``test_sd15_defaults_are_the_seeds``;
- 6 save with ``get_peft_model_state_dict`` + ``torch.save``, load with ``set_peft_model_state_dict``:
  ``test_seed_save_and_load_reads_our_lora_weights_pth`` (our snapshots' ``lora_weights.pth``);
- 7 and the complete example's step 7 (a pipeline around the adapted UNet): ``test_seed_inference_pipeline``;
- 6C text-encoder LoRA: ``test_seed_text_encoder_lora_is_ours``;
- 6D ``merge_lora_weights`` (and PEFT's/diffusers' merges): ``test_seed_merge``;
- 6E several adapters with weights: ``test_seed_several_adapters_with_weights``.
Not run: step 1 (``pip install``); step 3 and the complete example's data part (``datasets.load_dataset`` of a Hub
data set and torchvision: neither installed, and no network here); step 5 and the complete example's training
loop, which cannot run on any device: they call ``unet(noisy_images, timesteps)`` without the required
``encoder_hidden_states`` and feed 3-channel pixels to a 4-channel latent UNet
(``test_seed_training_loop_cannot_run_as_written`` shows the first); ``lightning_lora.train model=sd15`` is what
trains with the seed's numbers.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose_train
from omegaconf import open_dict

from lightning_lora.heads.diffusion import DIFFUSERS_FILE, SEED_STATE_FILE, apply_loras
from lightning_lora.models.sd_tiny import ensure_tiny_sd
from lightning_lora.train import run

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4  # optimizer steps of the short run: snapshots at step 2 and 4 (= final)
SEED_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # seed 002 Step 2B
PROBE_X = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
PROBE_T = torch.tensor([10, 700])
PROMPTS = ["a handwritten digit 3", "zero"]


# --------------------------------------------------------------------------- the seed's blocks, as written
def seed_step2a_load_and_freeze(model_id: str):
    from diffusers import UNet2DConditionModel

    # Load the pre-trained model
    unet = UNet2DConditionModel.from_pretrained(
        model_id,
        subfolder="unet",
        torch_dtype=torch.float16
    )

    # IMPORTANT: Freeze all parameters
    for param in unet.parameters():
        param.requires_grad = False
    return unet


def seed_step2b_add_lora(unet):
    from peft import LoraConfig

    # Configure LoRA parameters
    lora_config = LoraConfig(
        r=4,  # Rank: Paper shows r=4 often sufficient (Page 10, Table 6)
        lora_alpha=4,  # Scaling factor (typically equal to r)
        init_lora_weights="gaussian",  # Initialize A with Gaussian, B with zeros
        target_modules=["to_k", "to_q", "to_v", "to_out.0"],  # Which layers to adapt
    )

    # Add LoRA adapters to the UNet
    unet.add_adapter(lora_config)
    return lora_config


def seed_step2c_count(unet):
    # Only LoRA parameters will be trained
    lora_layers = filter(lambda p: p.requires_grad, unet.parameters())

    # Count trainable vs total parameters
    trainable_params = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    all_params = sum(p.numel() for p in unet.parameters())

    print(f"Trainable params: {trainable_params:,}")
    print(f"All params: {all_params:,}")
    print(f"Trainable %: {100 * trainable_params / all_params:.4f}%")
    return lora_layers, trainable_params, all_params


def seed_step4_optimizer(lora_layers, train_dataset, num_epochs: int):
    from diffusers.optimization import get_scheduler
    from torch.optim import AdamW
    from torch.utils.data import DataLoader

    # Create dataloader
    train_dataloader = DataLoader(
        train_dataset,
        batch_size=4,  # Adjust based on GPU memory
        shuffle=True
    )

    # Setup optimizer - ONLY for LoRA parameters
    optimizer = AdamW(
        lora_layers,  # Only optimize LoRA weights
        lr=1e-4,  # LoRA paper suggests higher LR is ok (Page 5, Section 5.1)
        betas=(0.9, 0.999),
        weight_decay=0.01,
        eps=1e-08
    )

    # Learning rate scheduler
    lr_scheduler = get_scheduler(
        "constant",  # or "linear", "cosine"
        optimizer=optimizer,
        num_warmup_steps=500,
        num_training_steps=len(train_dataloader) * num_epochs
    )
    return train_dataloader, optimizer, lr_scheduler


def seed_step5_train_one_epoch(unet, optimizer, train_dataloader, noise_scheduler, device, lr_scheduler):
    import torch.nn.functional as F  # the seed's complete example imports it; step 5 uses it unimported
    from tqdm import tqdm

    unet.train()
    total_loss = 0

    progress_bar = tqdm(train_dataloader, desc="Training", disable=True)

    for batch in progress_bar:
        # Move to device
        pixel_values = batch["pixel_values"].to(device)

        # Sample noise
        noise = torch.randn_like(pixel_values)

        # Sample random timesteps
        timesteps = torch.randint(
            0,
            noise_scheduler.config.num_train_timesteps,
            (pixel_values.shape[0],),
            device=device
        )

        # Add noise to images (forward diffusion process)
        noisy_images = noise_scheduler.add_noise(pixel_values, noise, timesteps)

        # Predict the noise residual
        noise_pred = unet(noisy_images, timesteps).sample

        # Calculate loss (MSE between predicted and actual noise)
        loss = F.mse_loss(noise_pred, noise)

        # Backpropagation
        optimizer.zero_grad()
        loss.backward()

        # Update ONLY LoRA parameters
        optimizer.step()
        lr_scheduler.step()

        total_loss += loss.item()
        progress_bar.set_postfix({"loss": loss.item()})

    return total_loss / len(train_dataloader)


def seed_step6_save(unet, path: str):
    from peft.utils import get_peft_model_state_dict

    # Save only LoRA weights (very small file!)
    lora_state_dict = get_peft_model_state_dict(unet)
    torch.save(lora_state_dict, path)

    print(f"LoRA weights saved. File size: ~{len(lora_state_dict)} tensors")
    return lora_state_dict


def seed_step6_load(model_id: str, lora_config, path: str):
    from diffusers import UNet2DConditionModel

    # Load LoRA weights later
    from peft.utils import set_peft_model_state_dict

    unet_new = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet")
    unet_new.add_adapter(lora_config)
    lora_weights = torch.load(path)
    set_peft_model_state_dict(unet_new, lora_weights)
    return unet_new


def seed_step7_inference(model_id: str, unet, device: str, out: str):
    from diffusers import StableDiffusionPipeline

    # Create pipeline with LoRA-adapted model
    pipeline = StableDiffusionPipeline.from_pretrained(
        model_id,
        unet=unet,
        torch_dtype=torch.float16
    )
    pipeline = pipeline.to(device)

    # Generate image
    prompt = "A naruto character with blue eyes and spiky hair"
    image = pipeline(prompt, num_inference_steps=50).images[0]
    image.save(out)
    return pipeline, image


def seed_6c_text_encoder(MODEL_ID: str):
    from peft import LoraConfig
    from transformers import CLIPTextModel

    # Load text encoder
    text_encoder = CLIPTextModel.from_pretrained(
        MODEL_ID,
        subfolder="text_encoder"
    )

    # Freeze base weights
    for param in text_encoder.parameters():
        param.requires_grad = False

    # Add LoRA to text encoder
    text_encoder_lora_config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj"],  # Text encoder attention
        lora_dropout=0.1
    )

    from peft import get_peft_model
    text_encoder = get_peft_model(text_encoder, text_encoder_lora_config)
    return text_encoder


def seed_6d_merge(unet):
    def merge_lora_weights(unet):
        """Merge LoRA weights into base model for faster inference"""

        for name, module in unet.named_modules():
            if hasattr(module, 'merge_adapter'):
                module.merge_adapter()
                print(f"Merged LoRA in: {name}")

        return unet

    # Merge for deployment
    unet_merged = merge_lora_weights(unet)
    return unet_merged


def seed_6e_several_adapters(MODEL_ID: str, naruto: str, anime: str):
    from diffusers import StableDiffusionPipeline

    # Load base model
    pipeline = StableDiffusionPipeline.from_pretrained(MODEL_ID)

    # Load multiple LoRA weights
    pipeline.load_lora_weights(naruto, adapter_name="naruto")
    pipeline.load_lora_weights(anime, adapter_name="anime")

    # Set adapter weights
    pipeline.set_adapters(["naruto", "anime"], adapter_weights=[0.7, 0.3])

    # Generate with combined styles
    image = pipeline("A character in naruto style").images[0]
    return pipeline, image


# --------------------------------------------------------------------------- one short model=sd15 run
class Trained:
    """A finished tiny ``model=sd15`` run: its directory, trained head, and the probe's outputs."""

    def __init__(self, out: Path, tiny: Path, objects: dict[str, Any]) -> None:
        self.out, self.tiny, self.head = out, tiny, objects["head"]
        self.final = out / "adapters" / "final"
        self.step2 = out / "adapters" / f"step_{2:07d}"
        objects["module"].eval()
        self.hidden, self.pred = probe(self.head.unet, self.head.text_encoder, self.head.tokenizer)

    def tokens(self) -> torch.Tensor:
        return self.head.tokenize(PROMPTS)


@torch.no_grad()
def probe(unet, text_encoder, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder hidden states of PROMPTS and the UNet's prediction for a fixed latent, in fp32 numbers."""
    ids = tokenizer(PROMPTS, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
    hidden = text_encoder(ids)[0]
    dtype = next(unet.parameters()).dtype
    pred = unet(PROBE_X.to(dtype), PROBE_T, hidden.to(dtype)).sample
    return hidden.float(), pred.float()


def unet_probe(unet, hidden: torch.Tensor) -> torch.Tensor:
    weight = next(unet.parameters())
    with torch.no_grad():
        return unet(PROBE_X.to(weight), PROBE_T.to(weight.device), hidden.to(weight)).sample.float().cpu()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    tmp = tmp_path_factory.mktemp("seed_sd")
    tiny = Path(ensure_tiny_sd(tmp / "sd_tiny"))
    cfg = compose_train([
        "model=sd15", f"model.pretrained={tiny}", "model.resolution=32", "model.train_text_encoder=true",
        "adapter.per_submodule={text_encoder:{dropout:0.1}}",  # the seed's 6C lora_dropout
        "data=digits", "data.num_images=24", f"paths.cache_dir={tmp / 'cache'}",
        f"trainer.max_steps={STEPS}", "callbacks.adapter_checkpoint.every_n_steps=2",
        "~callbacks.progress_bar", "~callbacks.sample_previews", "validate_before=false", "validate_after=false",
        "+trainer.limit_val_batches=0", "trainer.precision=32-true",
        "optimizer.lr=1e-2",  # 4 steps at the seed's 1e-4 would move the outputs less than fp16 rounds them
    ])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "run")
    with contextlib.redirect_stdout(io.StringIO()):
        _, objects = run(cfg)
    return Trained(tmp / "run", tiny, objects)


@pytest.fixture(scope="module")
def base(trained) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiny folder's own outputs (no LoRA)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(trained.tiny, subfolder="unet")
    te = CLIPTextModel.from_pretrained(trained.tiny, subfolder="text_encoder")
    return probe(unet, te, trained.head.tokenizer)


def test_the_run_trained_a_visible_adapter(trained, base):
    # the premise of every comparison below: the adapter moves both networks well past fp16 rounding
    assert max_diff(trained.pred, base[1]) > 0.05 and max_diff(trained.hidden, base[0]) > 0.05
    # both snapshots stay: the recipe's keep_last=3 once removed all but the newest while fewer than 3 existed
    assert sorted(p.name for p in (trained.out / "adapters").iterdir()) == ["final", "step_0000002", "step_0000004"]
    assert sorted(p.name for p in trained.final.iterdir()) == sorted(
        [DIFFUSERS_FILE, "pytorch_lora_weights_kohya.safetensors", SEED_STATE_FILE, "text_encoder", "unet"])


# --------------------------------------------------------------------------- 2A-2C, 4: set-up and defaults
def test_seed_lora_setup_is_our_adapter(trained, capsys):
    import json

    unet = seed_step2a_load_and_freeze(str(trained.tiny))
    assert unet.dtype == torch.float16 and not any(p.requires_grad for p in unet.parameters())
    lora_config = seed_step2b_add_lora(unet)
    ours = json.loads((trained.final / "unet" / "adapter_config.json").read_text())
    assert (ours["r"], ours["lora_alpha"], ours["init_lora_weights"]) == (
        lora_config.r, lora_config.lora_alpha, lora_config.init_lora_weights) == (4, 4, "gaussian")
    assert set(ours["target_modules"]) == set(lora_config.target_modules) == set(SEED_TARGETS)
    _, trainable, total = seed_step2c_count(unet)
    ours_trainable = sum(p.numel() for n, p in trained.head.unet.named_parameters() if "lora_" in n)
    assert trainable == ours_trainable > 0  # the same layers, the same shapes
    printed = capsys.readouterr().out
    assert f"Trainable params: {trainable:,}" in printed and f"All params: {total:,}" in printed


def test_seed_expected_counts_on_the_sd15_architecture():
    """The seed's printed numbers (Step 2C "Expected Output") against its own code on SD 1.5's UNet (its published
    config: the defaults with cross_attention_dim=768; built on the meta device, no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
    for param in unet.parameters():
        param.requires_grad = False
    base_total = sum(p.numel() for p in unet.parameters())
    seed_step2b_add_lora(unet)
    with contextlib.redirect_stdout(io.StringIO()):
        _, trainable, total = seed_step2c_count(unet)
    assert base_total == 859_520_964  # the seed's "All params" is the UNet without LoRA
    # what r=4 on to_q/to_k/to_v/to_out.0 gives (about 3.2 MB in fp32); the seed prints 1,476,608 (0.1718 %)
    assert (trainable, total) == (797_184, 859_520_964 + 797_184)


def test_sd15_defaults_are_the_seeds(trained):
    from hydra.utils import instantiate

    from lightning_lora.module import ScheduleSpec

    cfg = compose_train(["model=sd15"])
    assert (cfg.adapter.r, cfg.adapter.alpha, cfg.adapter.init, cfg.adapter.dropout) == (4, 4, "gaussian", 0.0)
    assert set(cfg.model.targets.unet) == set(SEED_TARGETS)
    assert list(cfg.model.targets.text_encoder) == ["q_proj", "v_proj"]  # seed 6C
    assert (cfg.model.resolution, cfg.data.batch_size, cfg.trainer.max_epochs) == (512, 4, 100)
    assert compose_train(["model=sd15", "adapter=r16"]).adapter.alpha == 16  # alpha = r for any rank

    # Step 4's optimizer and scheduler, over the seed's LoRA parameters (step 2A/2B), against ours
    unet = seed_step2a_load_and_freeze(str(trained.tiny))
    seed_step2b_add_lora(unet)
    with contextlib.redirect_stdout(io.StringIO()):
        lora_layers, _, _ = seed_step2c_count(unet)
    loader, optimizer, lr_scheduler = seed_step4_optimizer(lora_layers, list(range(8)), num_epochs=100)
    seed_group = optimizer.param_groups[0]
    ours = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad"):
        assert ours[key] == seed_group[key], key
    assert type(optimizer) is type(instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))]))
    # diffusers' "constant" ignores num_warmup_steps: 1e-4 from the first step, as our warmup_steps=0 gives
    schedule = ScheduleSpec.from_config(cfg.scheduler)
    factor = schedule.lr_lambda(len(loader) * 100)
    seed_lrs = []
    for _ in range(600):
        seed_lrs.append(lr_scheduler.get_last_lr()[0])
        optimizer.step()
        lr_scheduler.step()
    assert seed_lrs == [1e-4 * factor(step) for step in range(600)] == [1e-4] * 600


# --------------------------------------------------------------------------- 6, 7: save/load and inference
def test_seed_save_and_load_reads_our_lora_weights_pth(trained, base, tmp_path):
    ours = torch.load(trained.final / SEED_STATE_FILE, weights_only=True)
    # the seed's save, of the seed's own adapted UNet: the same names and shapes as our file
    unet = seed_step2a_load_and_freeze(str(trained.tiny))
    lora_config = seed_step2b_add_lora(unet)
    with contextlib.redirect_stdout(io.StringIO()):
        saved = seed_step6_save(unet, str(tmp_path / "naruto_lora_weights.pth"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    # the seed's load, of our file: every tensor lands, and the UNet is the one we trained
    unet_new = seed_step6_load(str(trained.tiny), lora_config, str(trained.final / SEED_STATE_FILE))
    state = unet_new.state_dict()
    assert all(torch.equal(state[k.replace(".weight", ".default.weight")], v) for k, v in ours.items())
    assert len(ours) == 2 * sum(1 for n, _ in unet_new.named_modules() if n.endswith(tuple(SEED_TARGETS)))
    assert max_diff(unet_probe(unet_new, trained.hidden), trained.pred) < 1e-5
    assert max_diff(unet_probe(unet_new, base[0]), base[1]) > 0.05  # not the base UNet


def test_seed_inference_pipeline(trained, base, tmp_path):
    """Step 7 wraps step 2's fp16 UNet; our adapter gets into it with step 6's two load lines (``torch.load``,
    ``set_peft_model_state_dict``) on that UNet (step 6's own ``unet_new`` is fp32 and fails in an fp16 pipeline)."""
    from peft.utils import set_peft_model_state_dict

    unet = seed_step2a_load_and_freeze(str(trained.tiny))
    seed_step2b_add_lora(unet)
    lora_weights = torch.load(str(trained.final / SEED_STATE_FILE))
    set_peft_model_state_dict(unet, lora_weights)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the seed's own choice (its complete example)
    pipeline, image = seed_step7_inference(str(trained.tiny), unet, device, str(tmp_path / "output_naruto.png"))
    assert image.size == (32, 32) and (tmp_path / "output_naruto.png").is_file()
    assert pipeline.unet is unet and unet.dtype == torch.float16
    assert max_diff(unet_probe(pipeline.unet, trained.hidden), trained.pred) < 1e-2  # fp16 rounding only
    assert max_diff(unet_probe(pipeline.unet, base[0]), base[1]) > 0.05


def test_seed_training_loop_cannot_run_as_written(trained):
    """Why step 5 (and the complete example's loop) is not run: the UNet call lacks ``encoder_hidden_states``."""
    from diffusers import DDPMScheduler

    model_id = str(trained.tiny)
    unet = seed_step2a_load_and_freeze(model_id).float()
    seed_step2b_add_lora(unet)
    with contextlib.redirect_stdout(io.StringIO()):
        lora_layers, _, _ = seed_step2c_count(unet)
    batch = [{"pixel_values": torch.zeros(3, 32, 32), "input_ids": "a handwritten digit 3"}]
    loader, optimizer, lr_scheduler = seed_step4_optimizer(lora_layers, batch, num_epochs=100)
    noise_scheduler = DDPMScheduler.from_pretrained(model_id, subfolder="scheduler")
    with pytest.raises(TypeError, match="encoder_hidden_states"):
        seed_step5_train_one_epoch(unet, optimizer, loader, noise_scheduler, "cpu", lr_scheduler)


# --------------------------------------------------------------------------- 6C, 6D, 6E
def test_seed_text_encoder_lora_is_ours(trained):
    import json

    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    text_encoder = seed_6c_text_encoder(str(trained.tiny))
    seed = text_encoder.peft_config["default"]
    ours = json.loads((trained.final / "text_encoder" / "adapter_config.json").read_text())
    assert (ours["r"], ours["lora_alpha"], ours["lora_dropout"]) == (seed.r, seed.lora_alpha, seed.lora_dropout)
    assert set(ours["target_modules"]) == set(seed.target_modules) == {"q_proj", "v_proj"}
    weights = load_file(trained.final / "text_encoder" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in get_peft_model_state_dict(text_encoder).items()} == {
        k: v.shape for k, v in weights.items()}
    result = set_peft_model_state_dict(text_encoder, weights)
    assert not result.unexpected_keys
    text_encoder.eval()
    with torch.no_grad():
        hidden = text_encoder(trained.tokens())[0]
    assert max_diff(hidden, trained.hidden) < 1e-5


def lora_layers_merged(model) -> list[bool]:
    from peft.tuners.lora import LoraLayer

    return [m.merged for m in model.modules() if isinstance(m, LoraLayer)]


def test_seed_merge(trained, base, capsys):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    # on the UNet the seed adapts in place (add_adapter), no module has merge_adapter: the seed's function merges
    # nothing, silently; diffusers' own unet.fuse_lora() does
    unet = seed_step2a_load_and_freeze(str(trained.tiny))
    lora_config = seed_step2b_add_lora(unet)
    unet_new = seed_step6_load(str(trained.tiny), lora_config, str(trained.final / SEED_STATE_FILE))
    capsys.readouterr()
    seed_6d_merge(unet_new)
    assert "Merged LoRA in" not in capsys.readouterr().out
    assert not any(lora_layers_merged(unet_new))
    unet_new.fuse_lora()
    assert all(lora_layers_merged(unet_new))
    assert max_diff(unet_probe(unet_new, trained.hidden), trained.pred) < 1e-4

    # on a PeftModel over our snapshot's PEFT directory it merges every layer
    fresh = UNet2DConditionModel.from_pretrained(trained.tiny, subfolder="unet")
    unet = PeftModel.from_pretrained(fresh, trained.final / "unet")
    merged = seed_6d_merge(unet)
    assert "Merged LoRA in" in capsys.readouterr().out
    assert lora_layers_merged(merged) and all(lora_layers_merged(merged))
    assert max_diff(unet_probe(merged, trained.hidden), trained.pred) < 1e-4
    # and PEFT's merge_and_unload gives a plain UNet with the trained outputs
    plain = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(trained.tiny, subfolder="unet"),
                                      trained.final / "unet").merge_and_unload()
    assert isinstance(plain, UNet2DConditionModel) and not lora_layers_merged(plain)
    assert max_diff(unet_probe(plain, trained.hidden), trained.pred) < 1e-4
    assert max_diff(unet_probe(plain, base[0]), base[1]) > 0.05


def pipeline_probe(pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    return probe(pipeline.unet, pipeline.text_encoder, pipeline.tokenizer)


def test_seed_several_adapters_with_weights(trained, base):
    from diffusers import StableDiffusionPipeline

    # "naruto" = the run's step-2 snapshot as a file, "anime" = its final snapshot as a directory
    pipeline, image = seed_6e_several_adapters(str(trained.tiny), str(trained.step2 / DIFFUSERS_FILE),
                                               str(trained.final))
    assert image.size == (32, 32)
    hidden, pred = pipeline_probe(pipeline)
    folded = StableDiffusionPipeline.from_pretrained(trained.tiny)
    apply_loras(folded, [(trained.step2 / DIFFUSERS_FILE, 0.7), (trained.final / DIFFUSERS_FILE, 0.3)])
    ref_hidden, ref_pred = pipeline_probe(folded)
    assert max_diff(hidden, ref_hidden) < 1e-4 and max_diff(pred, ref_pred) < 1e-4  # 0.7 ΔW_naruto + 0.3 ΔW_anime
    assert max_diff(pred, trained.pred) > 1e-3  # not the final adapter alone

    pipeline.set_adapters(["naruto", "anime"], adapter_weights=[0.0, 1.0])
    hidden, pred = pipeline_probe(pipeline)
    assert max_diff(hidden, trained.hidden) < 1e-5 and max_diff(pred, trained.pred) < 1e-5
    pipeline.set_adapters(["naruto", "anime"], adapter_weights=[0.0, 0.0])
    hidden, pred = pipeline_probe(pipeline)
    assert max_diff(hidden, base[0]) < 1e-6 and max_diff(pred, base[1]) < 1e-6  # weight 0 = the base model

    # diffusers' fuse_lora of one adapter, then unload: plain layers with the trained weights
    pipeline.set_adapters(["anime"])
    pipeline.fuse_lora(adapter_names=["anime"])
    pipeline.unload_lora_weights()
    assert not lora_layers_merged(pipeline.unet)
    hidden, pred = pipeline_probe(pipeline)
    assert max_diff(hidden, trained.hidden) < 1e-4 and max_diff(pred, trained.pred) < 1e-4
