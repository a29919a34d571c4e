"""Seed 003 (vembed-factory's LoRA guide) run against this project, on the tiny BERT and the tiny CLIP.

- The seed's YAML configs and its CLI override, each key mapped to ours (``SEED_KEYS``; keys without a
  counterpart here are listed in ``NOT_OURS`` with the reason), composed into a real config.
- The seed's Python blocks as the seed writes them, only the paths filled in: "Load and inference"
  (``PeftModel.from_pretrained(AutoModel.from_pretrained(base), "output/checkpoint-3000")``, then
  ``model(input_ids)``), "Merge LoRA into Base Model" (``merge_and_unload`` + ``save_pretrained``) and "Use with
  vembed-factory" (``Predictor(model_path=...)``, ``encode_text("a cat")``, ``encode_image("cat.jpg")``), with
  ``from vembed import Predictor`` -> ``from lightning_lora.predict import Predictor``. The seed's
  ``output/checkpoint-3000`` is a run's ``adapters/step_N/model`` (the whole-model PEFT export); the embeddings
  of the model PEFT builds there must equal the Predictor's.
- The seed's target list shared across families (``q_proj, v_proj, query, value, key, dense``), full fine-tuning
  (``use_lora: false`` -> ``adapter.enabled=false``) against LoRA, and ``torch_dtype`` -> ``model.dtype``.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import FAST, compose_train
from helpers import assert_one_error_line, train_main
from omegaconf import open_dict
from safetensors.torch import load_file

from lightning_lora.adapters import AdapterSpec
from lightning_lora.fileio import path_bytes
from lightning_lora.train import run

pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------- the seed's configs, verbatim
SEED_QUICK_START = """
use_lora: true

# Optional: customize LoRA parameters
lora_r: 16                           # Rank (higher = more params, more memory)
lora_alpha: 32                       # Scaling factor
lora_dropout: 0.05                   # Dropout for regularization
lora_target_modules:                 # Modules to apply LoRA to
  - "q_proj"
  - "v_proj"
  - "query"
  - "value"
  - "key"
  - "dense"
"""
SEED_COMPLETE = """
# Model
model_name: "Qwen/Qwen3-VL-Embedding-2B"
torch_dtype: "bfloat16"

# LoRA Configuration
use_lora: true
lora_r: 16                          # Rank of LoRA adapter
lora_alpha: 32                       # Scales LoRA by alpha/r
lora_dropout: 0.05                   # Dropout within adapter
lora_target_modules:                 # Which modules to apply LoRA
  - "q_proj"                         # Query projection
  - "v_proj"                         # Value projection
  - "query"                          # Alternative naming
  - "value"
  - "key"
  - "dense"

# Training
batch_size: 64
learning_rate: 1e-4                  # LoRA typically uses higher LR
epochs: 3

# Data
data_path: "data/train.jsonl"
output_dir: "output_lora"
"""
SEED_QUICK_EXPERIMENT = """
model_name: "Qwen/Qwen3-VL-Embedding-2B"
use_lora: true
lora_r: 8
lora_alpha: 16
batch_size: 32
learning_rate: 1e-4
epochs: 1
"""
SEED_PRODUCTION = """
model_name: "Qwen/Qwen3-VL-Embedding-2B"
use_lora: true
lora_r: 32
lora_alpha: 64
lora_dropout: 0.1
batch_size: 64
learning_rate: 5e-5
epochs: 3
gradient_checkpointing: true
"""
SEED_FSDP = """
model_name: "Qwen/Qwen3-VL-Embedding-8B"
use_fsdp: true
use_lora: true
lora_r: 16
lora_alpha: 32
batch_size: 16
learning_rate: 2e-5
epochs: 3
gradient_checkpointing: true
"""
SEED_MRL = """
use_lora: true
use_mrl: true
mrl_dims: [1024, 768, 512, 256]
"""
#: the seed's per-family target blocks ("Target Modules"), and the layer kinds each gives on our tiny models
SEED_FAMILY_TARGETS = {
    "qwen3_vl_tiny": (["q_proj", "v_proj", "query", "value", "key"], {"q_proj", "v_proj"}),  # Vision-Language
    "clip_tiny": (["q_proj", "v_proj", "out_proj"], {"q_proj", "v_proj", "out_proj"}),  # CLIP Models
    "bert": (["query", "key", "value", "dense"], {"query", "key", "value", "dense"}),  # Text Models (BERT, Qwen)
}
SEED_CLI_OVERRIDE = "use_lora=true lora_r=32 lora_alpha=64"  # python run.py config.yaml --config_override ...
SEED_TARGETS = ["q_proj", "v_proj", "query", "value", "key", "dense"]

#: the seed's keys -> ours
SEED_KEYS = {
    "use_lora": "adapter.enabled",
    "lora_r": "adapter.r",
    "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout",
    "lora_target_modules": "adapter.targets",
    "modules_to_save": "adapter.modules_to_save",
    "torch_dtype": "model.dtype",
    "model_name": "model.pretrained",
    "batch_size": "data.batch_size",
    "learning_rate": "optimizer.lr",
    "epochs": "trainer.max_epochs",
    "data_path": "data.train_path",
    "output_dir": "hydra.run.dir",
    "gradient_checkpointing": "gradient_checkpointing",
    "mrl_dims": "model.mrl_dims",
}
#: the seed's keys with no counterpart, and why
NOT_OURS = {
    "use_gradient_cache": "model.gradient_cache.chunk_size=N (a chunk size, not a switch)",
    "use_fsdp": "strategy=fsdp (a config group, not a flag)",
    "use_mrl": "model.mrl_dims=[...] turns Matryoshka on (no separate switch)",
}


def seed_overrides(text: str, **paths: str) -> list[str]:
    """The seed's YAML as our command-line overrides (``paths`` replace its example paths; ``use_fsdp`` picks the
    strategy group; the other ``NOT_OURS`` switches have no flag of their own and are left out)."""
    out = []
    for key, value in yaml.safe_load(text).items():
        if key == "use_fsdp":
            out += ["strategy=fsdp"] if value else []
            continue
        if key in NOT_OURS:
            continue
        value = paths.get(key, value)
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, list):
            value = "[" + ",".join(map(str, value)) + "]"
        out.append(f"{SEED_KEYS[key]}={value}")
    return out


def test_seed_configs_map_to_ours(tiny_bert, tmp_path) -> None:
    cfg = compose_train(["model=hf_encoder", *seed_overrides(SEED_COMPLETE, model_name=str(tiny_bert),
                                                              output_dir=str(tmp_path / "out"))])
    spec = AdapterSpec.from_config(cfg.adapter)
    assert (spec.enabled, spec.r, spec.alpha, spec.dropout, spec.targets) == (True, 16, 32.0, 0.05, SEED_TARGETS)
    assert cfg.model.dtype == "bfloat16" and cfg.data.batch_size == 64 and cfg.trainer.max_epochs == 3
    assert cfg.optimizer.lr == pytest.approx(1e-4) and cfg.data.train_path == "data/train.jsonl"
    quick = AdapterSpec.from_config(compose_train(seed_overrides(SEED_QUICK_START)).adapter)
    assert (quick.enabled, quick.r, quick.alpha, quick.targets) == (True, 16, 32.0, SEED_TARGETS)
    cli = [f"{SEED_KEYS[k]}={v}" for k, v in (kv.split("=") for kv in SEED_CLI_OVERRIDE.split())]
    over = AdapterSpec.from_config(compose_train(cli).adapter)
    assert (over.enabled, over.r, over.alpha) == (True, 32, 64.0)
    full = AdapterSpec.from_config(compose_train(["adapter.enabled=false"]).adapter)
    assert full.enabled is False
    assert not set(NOT_OURS) & set(SEED_KEYS)
    quick = compose_train(["model=qwen3_vl_embedding", *seed_overrides(SEED_QUICK_EXPERIMENT)])
    assert (quick.adapter.r, quick.adapter.alpha, quick.data.batch_size, quick.trainer.max_epochs) == (8, 16, 32, 1)
    assert quick.model.pretrained == "Qwen/Qwen3-VL-Embedding-2B"
    prod = compose_train(["model=qwen3_vl_embedding", *seed_overrides(SEED_PRODUCTION)])
    assert (prod.adapter.r, prod.adapter.alpha, prod.adapter.dropout) == (32, 64, 0.1) and prod.gradient_checkpointing
    assert prod.optimizer.lr == pytest.approx(5e-5)
    fsdp = compose_train(["model=qwen3_vl_embedding", *seed_overrides(SEED_FSDP)])
    assert fsdp.trainer.strategy._target_.endswith("FSDPStrategy") and fsdp.model.pretrained.endswith("-8B")
    mrl = compose_train(seed_overrides(SEED_MRL))
    assert list(mrl.model.mrl_dims) == [1024, 768, 512, 256]


@pytest.mark.parametrize("family", sorted(SEED_FAMILY_TARGETS))
def test_seed_target_blocks_per_family(family, tiny_bert, tmp_path) -> None:
    from hydra.utils import instantiate

    from lightning_lora.module import LoRAAdaptationModule

    targets, kinds = SEED_FAMILY_TARGETS[family]
    preset = _bert(tiny_bert) if family == "bert" else [f"model={family}"]
    head = instantiate(compose_train([*preset, f"paths.cache_dir={tmp_path / 'cache'}"]).model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = LoRAAdaptationModule(head, {"targets": targets})
    got = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in module.trainable_names() if ".lora_A." in n}
    assert got == kinds
    unmatched = sorted(set(targets) - kinds)
    assert any(f"{unmatched} match no module" in str(w.message) for w in caught) == bool(unmatched)


# --------------------------------------------------------------------------- short runs
class Trained:
    def __init__(self, out: Path, metrics: dict[str, Any], objects: dict[str, Any], caught: list[str]) -> None:
        self.out, self.head, self.module, self.warnings = out, objects["head"], objects["module"], caught
        self.metrics = metrics
        self.final = out / "adapters" / "final"
        self.step = sorted((out / "adapters").glob("step_*"))[-1]


def _train(tmp: Path, overrides: list[str]) -> Trained:
    fast = [o for o in FAST if not o.startswith("model.")]  # the text lengths are _bert's (CLIP has none)
    cfg = compose_train([*overrides, f"paths.cache_dir={tmp / 'cache'}", *fast, "trainer.max_steps=2",
                         "validate_before=false", "validate_after=false", "+trainer.limit_val_batches=0",
                         "scheduler.name=constant", "trainer.precision=32-true"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "run")
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        metrics, objects = run(cfg)
    return Trained(tmp / "run", metrics, objects, [str(w.message) for w in caught])


def _bert(tiny_bert: Path) -> list[str]:
    return ["model=minilm", f"model.pretrained={tiny_bert}", "model.query_max_length=16", "model.doc_max_length=16"]


CLIP = ["model=clip_tiny", "model.vision=true", "data=digits_retrieval", "data.num_images=48", "data.batch_size=8"]
SEED_LORA = ["adapter.enabled=true", "adapter.r=16", "adapter.alpha=32", "adapter.dropout=0.05",
             f"adapter.targets=[{','.join(SEED_TARGETS)}]", "optimizer.lr=5e-3"]  # lr: visible change in 2 steps


@pytest.fixture(scope="module")
def bert_lora(tmp_path_factory, tiny_bert, one_thread) -> Trained:
    return _train(tmp_path_factory.mktemp("seed003-bert"), [*_bert(tiny_bert), *SEED_LORA])


@pytest.fixture(scope="module")
def clip_lora(tmp_path_factory, one_thread) -> Trained:
    return _train(tmp_path_factory.mktemp("seed003-clip"), [*CLIP, *SEED_LORA])


@pytest.fixture(scope="module")
def bert_full(tmp_path_factory, tiny_bert, one_thread) -> Trained:
    return _train(tmp_path_factory.mktemp("seed003-full"), [*_bert(tiny_bert), "adapter.enabled=false",
                                                             "optimizer.lr=1e-3"])


# --------------------------------------------------------------------------- targets across families
def test_one_target_list_for_every_family(bert_lora, clip_lora) -> None:
    assert any("['q_proj', 'v_proj'] match no module in embedding.encoder" in w for w in bert_lora.warnings)
    for tower in ("text", "vision"):
        assert any(f"['dense', 'key', 'query', 'value'] match no module in embedding.{tower}" in w
                   for w in clip_lora.warnings), clip_lora.warnings
    assert _adapted_kinds(bert_lora) == {"query", "key", "value", "dense"}
    assert _adapted_kinds(clip_lora) == {"q_proj", "v_proj"}


def _adapted_kinds(trained: Trained) -> set[str]:
    """The last name part of every layer that got LoRA."""
    return {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trained.module.trainable_names() if ".lora_A." in n}


def test_a_target_list_matching_nothing_is_one_line(tiny_bert, tmp_path, capsys) -> None:
    rc = train_main([*_bert(tiny_bert), f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
                     "adapter.targets=[q_proj,v_proj]", *FAST])
    assert_one_error_line(rc, capsys.readouterr().err,
                          "adapter targets ['q_proj', 'v_proj'] match no module in embedding.encoder; layers there:")


# --------------------------------------------------------------------------- the seed's Python blocks
TEXTS = ["a cat", "a photo of a dog", "def add(a, b): return a + b"]


def _mean_pool(output: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).float()
    return F.normalize((output.last_hidden_state * mask).sum(1) / mask.sum(1), dim=-1)


def test_seed_load_merge_and_predictor_bert(bert_lora, tiny_bert, tmp_path) -> None:
    from transformers import AutoTokenizer

    checkpoint = bert_lora.step / "model"  # the seed's "output/checkpoint-3000"
    tokens = AutoTokenizer.from_pretrained(tiny_bert)(TEXTS, padding=True, return_tensors="pt")
    input_ids = tokens["input_ids"]

    # --- seed: "Load and Inference" (only the model name and checkpoint path filled in) ---
    from peft import PeftModel
    from transformers import AutoModel

    # Load base model
    base_model = AutoModel.from_pretrained(str(tiny_bert))

    # Load LoRA adapter
    model = PeftModel.from_pretrained(base_model, str(checkpoint))

    # Inference
    model.eval()
    with torch.no_grad():
        output = model(input_ids)
    # --- end of the seed's block ---
    assert not any("pooler" in n and "lora_" in n for n, _ in model.named_parameters())  # only trained layers
    peft_emb = _mean_pool(model(**tokens), tokens["attention_mask"]).detach()
    assert torch.equal(output.last_hidden_state, model(input_ids).last_hidden_state)

    # --- seed: "Use with vembed-factory" (from vembed import Predictor -> ours) ---
    from lightning_lora.predict import Predictor

    # Works seamlessly with LoRA checkpoints
    predictor = Predictor(model_path=str(checkpoint))

    text_emb = predictor.encode_text("a cat")
    # --- end (encode_image: the text family has no images; the CLIP test runs it) ---
    ours = predictor.encode_text(TEXTS)
    diff = (ours - peft_emb).abs().max().item()
    print(f"bert: PeftModel on the whole AutoModel vs Predictor, max |diff| = {diff:.2e}")
    assert diff < 1e-5 and torch.allclose(text_emb, ours[:1], atol=1e-6)
    base = _mean_pool(AutoModel.from_pretrained(str(tiny_bert)).eval()(**tokens), tokens["attention_mask"]).detach()
    assert (ours - base).abs().max() > 1e-3  # the adapter is really applied
    for path in (bert_lora.out, bert_lora.final, bert_lora.final / "model", bert_lora.final / "encoder"):
        assert torch.allclose(Predictor(path).encode_text(TEXTS), Predictor(bert_lora.final).encode_text(TEXTS))

    # --- seed: "Merge LoRA into Base Model" ---
    # Merge adapter into base model
    merged_model = model.merge_and_unload()

    # Save merged model
    merged_model.save_pretrained(str(tmp_path / "output" / "merged_model"))
    # --- end of the seed's block ---
    reloaded = AutoModel.from_pretrained(str(tmp_path / "output" / "merged_model")).eval()
    assert not any("lora_" in n for n, _ in reloaded.named_parameters())
    merged_emb = _mean_pool(reloaded(**tokens), tokens["attention_mask"]).detach()
    assert (merged_emb - peft_emb).abs().max() < 1e-5


def test_seed_load_and_predictor_clip(clip_lora, pictures) -> None:
    from transformers import AutoTokenizer, CLIPImageProcessorPil

    base_dir = str(clip_lora.head.embedder.pretrained)
    checkpoint = clip_lora.final / "model"
    tokens = AutoTokenizer.from_pretrained(base_dir)(TEXTS, padding=True, truncation=True, return_tensors="pt")
    pixels = CLIPImageProcessorPil.from_pretrained(base_dir)(images=[_rgb(p) for p in pictures],
                                                              return_tensors="pt")["pixel_values"]
    # --- seed: "Load and Inference" ---
    from peft import PeftModel
    from transformers import AutoModel

    base_model = AutoModel.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base_model, str(checkpoint))
    model.eval()
    with torch.no_grad():  # CLIPModel's forward wants text and pixels together: the seed's model(input_ids) is
        output = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],  # its two halves
                       pixel_values=pixels)
    # --- end ---
    lora_layers = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert any("text_model" in n for n in lora_layers) and any("vision_model" in n for n in lora_layers)
    peft_text, peft_image = F.normalize(output.text_embeds, dim=-1), F.normalize(output.image_embeds, dim=-1)

    from lightning_lora.predict import Predictor

    predictor = Predictor(model_path=str(checkpoint))
    text_emb = predictor.encode_text("a cat")
    image_emb = predictor.encode_image(pictures[0])
    diffs = ((predictor.encode_text(TEXTS) - peft_text).abs().max().item(),
             (predictor.encode_image(pictures) - peft_image).abs().max().item())
    print(f"clip: PeftModel on the whole CLIPModel vs Predictor, max |diff| text {diffs[0]:.2e}, "
          f"image {diffs[1]:.2e}")
    assert max(diffs) < 1e-5
    assert torch.allclose(text_emb, peft_text[:1], atol=1e-5) and torch.allclose(image_emb, peft_image[:1], atol=1e-5)
    with torch.no_grad():
        base = AutoModel.from_pretrained(base_dir).eval()(**tokens, pixel_values=pixels).image_embeds
    base = F.normalize(base, dim=-1)
    assert (base - peft_image).abs().max() > 1e-3  # the vision adapter is really applied


def _rgb(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


# --------------------------------------------------------------------------- LoRA vs full fine-tuning
def _base_state(tiny_bert: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(tiny_bert), add_pooling_layer=False).state_dict()


def test_full_fine_tuning_changes_the_base_and_lora_does_not(bert_full, bert_lora, tiny_bert) -> None:
    base = _base_state(tiny_bert)
    # LoRA: every base tensor as it was (PEFT keeps the wrapped layer's weight under .base_layer)
    lora_base = {n.replace(".base_layer", ""): p for n, p in bert_lora.head.embedder.encoder.named_parameters()
                 if "lora_" not in n}
    assert set(lora_base) == set(base)
    assert all(torch.equal(p, base[n]) for n, p in lora_base.items())

    # full: the snapshot is the whole trained model, and it moved
    full = load_file(str(bert_full.final / "model" / "model.safetensors"))
    moved = [n for n in base if n in full and not torch.equal(full[n], base[n])]
    assert len(moved) > len(base) // 2, (len(moved), len(base))
    assert not (bert_full.final / "encoder").exists() and (bert_full.step / "model" / "config.json").is_file()

    # the checkpoint holds the full weights (every encoder tensor), nothing of LoRA
    ckpt = torch.load(bert_full.out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    names = {k.removeprefix("head.embedder.encoder.") for k in ckpt["state_dict"]}
    assert names == {n for n, _ in bert_full.head.embedder.encoder.named_parameters()} and len(names) > 20
    assert "Full fine-tuning" in bert_full.module.adapter_summary()
    # the sweep column adapter_bytes: LoRA without its whole-model copy, full fine-tuning the whole model
    lora_bytes, full_bytes = bert_lora.metrics["adapter_bytes"], bert_full.metrics["adapter_bytes"]
    assert lora_bytes == path_bytes(bert_lora.final) - path_bytes(bert_lora.final / "model") > 0
    assert full_bytes == path_bytes(bert_full.final) > 10 * lora_bytes
    print(f"adapter_bytes: LoRA r16 {lora_bytes:,}, full fine-tuning {full_bytes:,}")
    counts = bert_full.module.parameter_counts()
    everything = sum(p.numel() for p in bert_full.head.embedder.encoder.parameters())
    assert counts[0].trainable == counts[0].original == everything

    from transformers import AutoModel, AutoTokenizer

    from lightning_lora.predict import Predictor

    tokens = AutoTokenizer.from_pretrained(str(bert_full.final / "model"))(TEXTS, padding=True, return_tensors="pt")
    plain = _mean_pool(AutoModel.from_pretrained(str(bert_full.final / "model")).eval()(**tokens),
                       tokens["attention_mask"]).detach()
    predictor = Predictor(model_path=bert_full.out)
    assert predictor.adapters == {} and (predictor.encode_text(TEXTS) - plain).abs().max() < 1e-5


def test_full_fine_tuning_snapshot_of_clip(tmp_path, pictures) -> None:
    """CLIP trained whole: the snapshot's model/ is a CLIPModel folder; plain transformers and the Predictor agree."""
    from hydra.utils import instantiate
    from transformers import AutoModel

    from lightning_lora.module import LoRAAdaptationModule
    from lightning_lora.predict import Predictor

    head = instantiate(compose_train([*CLIP[:2], f"paths.cache_dir={tmp_path / 'cache'}"]).model)
    module = LoRAAdaptationModule(head, {"enabled": False})
    assert module.adapters == {} and set(module.full_submodules) == {"text", "vision"}
    with torch.no_grad():  # a trained vision tower differs from the base one
        head.embedder.vision.visual_projection.weight.mul_(-1.0)
    module.save_adapters(tmp_path / "snap")
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == ["model"]
    plain = AutoModel.from_pretrained(str(tmp_path / "snap" / "model")).eval()
    predictor = Predictor(tmp_path / "snap")
    with torch.no_grad():
        pixels = head.embedder.image_processor(images=[_rgb(p) for p in pictures], return_tensors="pt")["pixel_values"]
        features = plain.get_image_features(pixel_values=pixels)
    expected = F.normalize(getattr(features, "pooler_output", features), dim=-1)  # an output object in some versions
    assert (predictor.encode_image(pictures) - expected).abs().max() < 1e-5


def test_init_from_with_full_fine_tuning_is_one_line(tmp_path) -> None:
    from lightning_lora.errors import UserError

    with pytest.raises(UserError, match=r"adapter.init_from=.* but adapter.enabled=false"):
        AdapterSpec(enabled=False, init_from=str(tmp_path))
    with pytest.raises(UserError, match="adapter.enabled='no' must be true or false"):
        AdapterSpec(enabled="no")


# --------------------------------------------------------------------------- torch_dtype -> model.dtype
def test_model_dtype_for_every_embedder(tiny_bert, tmp_path) -> None:
    from hydra.utils import instantiate

    for overrides, submodule in ((_bert(tiny_bert), "encoder"), (CLIP[:1], "text")):
        cfg = compose_train([*overrides, "model.dtype=bfloat16", f"paths.cache_dir={tmp_path / 'cache'}"])
        head = instantiate(cfg.model)
        dtypes = {p.dtype for p in head.adaptable_submodules()[submodule].parameters()}
        assert dtypes == {torch.bfloat16}, (overrides[0], dtypes)
    bf16 = _train(tmp_path / "bf16", [*_bert(tiny_bert), *SEED_LORA, "model.dtype=bfloat16"])
    encoder = dict(bf16.head.embedder.encoder.named_parameters())
    lora = {p.dtype for n, p in encoder.items() if "lora_" in n}
    frozen = {p.dtype for n, p in encoder.items() if "lora_" not in n}
    assert lora == {torch.float32} and frozen == {torch.bfloat16}  # LoRA trains in fp32 on a bf16 base

    from lightning_lora.predict import Predictor

    predictor = Predictor(bf16.out)  # the run's dtype comes back with its settings
    assert next(predictor.embedder.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(predictor.encode_text(TEXTS)).all()


def test_bad_model_dtype_is_one_line(tiny_bert, tmp_path, capsys) -> None:
    rc = train_main([*_bert(tiny_bert), f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
                     "model.dtype=float8", *FAST])
    assert_one_error_line(rc, capsys.readouterr().err, "model.dtype='float8' is unknown; valid:")
