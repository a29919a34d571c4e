"""The Predictor: adapters from a run's ``adapters/final`` give the embeddings plain PEFT gives, the merged
model that plain transformers loads gives them too, an untrained adapter changes nothing, and ``dim=``
truncation is re-normalised. Adapters are made here with PEFT directly (random B), as a run would save them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image

from lightning_lora.errors import UserError
from lightning_lora.predict import Predictor

TEXTS = ["def add(a, b): return a + b", "sum of two numbers", "a handwritten digit 3"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32 + 8 * i, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths


def save_adapter(module: torch.nn.Module, out: Path, targets: list[str], random: bool = True,
                 modules_to_save: list[str] | None = None) -> Path:
    """What a run writes for one submodule: a PEFT directory (random B unless ``random=False``)."""
    torch.manual_seed(0)
    peft = get_peft_model(module, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=not random,
                                             modules_to_save=modules_to_save))
    if modules_to_save:  # a trained projection differs from the base one
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "modules_to_save" in name:
                    p.add_(0.1 * torch.randn_like(p))
    peft.save_pretrained(out)
    return out


def mean_pool(model, tokenizer, texts: list[str], max_length: int = 64) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


# --------------------------------------------------------------------------- text
def test_text_predictor_equals_peft_and_the_merged_model(tmp_path, tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    final = tmp_path / "run" / "adapters" / "final"
    save_adapter(AutoModel.from_pretrained(tiny_bert, add_pooling_layer=False), final / "encoder",
                 ["query", "key", "value", "dense"])
    predictor = Predictor.from_pretrained(tiny_bert, final, query_max_length=64)
    assert predictor.family == "text" and set(predictor.adapters) == {"encoder"}
    ours = predictor.encode_text(TEXTS, batch_size=2)
    assert ours.shape == (3, 32) and torch.allclose(ours.norm(dim=-1), torch.ones(3))

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    peft = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert, add_pooling_layer=False),
                                     str(final / "encoder")).eval()
    reference = mean_pool(peft, tok, TEXTS)
    assert torch.allclose(ours, reference, atol=1e-6)
    base = mean_pool(AutoModel.from_pretrained(tiny_bert, add_pooling_layer=False).eval(), tok, TEXTS)
    assert not torch.allclose(ours, base, atol=1e-3)  # the adapter is really applied

    out = predictor.merge_and_save(tmp_path / "merged")
    assert predictor.adapters == {} and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    merged = AutoModel.from_pretrained(out).eval()  # plain transformers, no PEFT
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(mean_pool(merged, AutoTokenizer.from_pretrained(out), TEXTS), ours, atol=1e-5)
    assert torch.allclose(predictor.encode_text(TEXTS), ours, atol=1e-5)  # still usable, now merged
    with pytest.raises(UserError, match="exists and is not empty"):
        predictor.merge_and_save(out)


def test_untrained_adapter_equals_base_and_dim_truncation(tmp_path, tiny_bert):
    from transformers import AutoModel

    save_adapter(AutoModel.from_pretrained(tiny_bert, add_pooling_layer=False), tmp_path / "zero", ["query", "value"],
                 random=False)
    base = Predictor.from_pretrained(tiny_bert).encode_text(TEXTS)
    adapted = Predictor.from_pretrained(tiny_bert, tmp_path / "zero")  # a bare PEFT dir goes to `encoder`
    assert set(adapted.adapters) == {"encoder"}
    assert torch.equal(adapted.encode_text(TEXTS), base)  # B = 0: exactly the base model
    short = adapted.encode_text(TEXTS, dim=8)
    assert short.shape == (3, 8) and torch.allclose(short.norm(dim=-1), torch.ones(3))
    assert torch.allclose(short, F.normalize(base[:, :8], dim=-1), atol=1e-6)
    assert adapted.encode("single text").shape == (1, 32)
    with pytest.raises(UserError, match="dim=64 must be an integer from 1 to the embedding size 32"):
        adapted.encode_text(TEXTS, dim=64)


def test_adapter_dir_errors(tmp_path, tiny_bert, tiny_clip_dir):
    with pytest.raises(UserError, match="adapter_dir: no such directory"):
        Predictor.from_pretrained(tiny_bert, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no PEFT adapter \(adapter_config.json\)"):
        Predictor.from_pretrained(tiny_bert, tmp_path / "empty")
    from transformers import AutoModel

    save_adapter(AutoModel.from_pretrained(tiny_bert, add_pooling_layer=False), tmp_path / "final" / "unet", ["query"])
    with pytest.raises(UserError, match="is for submodule 'unet', which the text embedder does not have"):
        Predictor.from_pretrained(tiny_bert, tmp_path / "final")
    with pytest.raises(UserError, match="needs a 'qwen3_vl' model"):
        Predictor.from_pretrained(tiny_clip_dir, family="qwen3_vl")
    from transformers import CLIPTextModelWithProjection

    # a text-tower adapter filed under `vision`: PEFT would only warn and leave the vision LoRA at zero
    save_adapter(CLIPTextModelWithProjection.from_pretrained(tiny_clip_dir), tmp_path / "wrong" / "vision", ["q_proj"])
    with pytest.raises(UserError, match=r"adapter .*wrong/vision does not fit clip.vision: tensor .*text_model"):
        Predictor.from_pretrained(tiny_clip_dir, tmp_path / "wrong")


# --------------------------------------------------------------------------- CLIP
def test_clip_predictor_text_and_vision_adapters(tmp_path, tiny_clip_dir, images):
    from transformers import (
        AutoModel,
        CLIPImageProcessorPil,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

    final = tmp_path / "adapters" / "final"
    targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    save_adapter(CLIPTextModelWithProjection.from_pretrained(tiny_clip_dir), final / "text", targets,
                 modules_to_save=["text_projection"])
    save_adapter(CLIPVisionModelWithProjection.from_pretrained(tiny_clip_dir), final / "vision", targets)
    predictor = Predictor.from_pretrained(tiny_clip_dir, final)
    assert predictor.family == "clip" and set(predictor.adapters) == {"text", "vision"}
    text, image = predictor.encode_text(TEXTS), predictor.encode_image(images, batch_size=2)
    assert text.shape == (3, 16) and image.shape == (3, 16)

    tok, proc = CLIPTokenizer.from_pretrained(tiny_clip_dir), CLIPImageProcessorPil.from_pretrained(tiny_clip_dir)
    tokens = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
    pixels = proc(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]
    peft_text = PeftModel.from_pretrained(CLIPTextModelWithProjection.from_pretrained(tiny_clip_dir),
                                          str(final / "text"))
    peft_vision = PeftModel.from_pretrained(CLIPVisionModelWithProjection.from_pretrained(tiny_clip_dir),
                                            str(final / "vision"))
    with torch.no_grad():
        assert torch.allclose(text, F.normalize(peft_text.eval()(**tokens).text_embeds, dim=-1), atol=1e-6)
        assert torch.allclose(image, F.normalize(peft_vision.eval()(pixel_values=pixels).image_embeds, dim=-1),
                              atol=1e-6)

    out = predictor.merge_and_save(tmp_path / "merged")
    merged = AutoModel.from_pretrained(out).eval()  # a CLIPModel, projection included
    with torch.no_grad():
        merged_text = F.normalize(merged.get_text_features(**tokens).pooler_output, dim=-1)
        merged_image = F.normalize(merged.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    assert torch.allclose(merged_text, text, atol=1e-5)
    assert torch.allclose(merged_image, image, atol=1e-5)
    assert (out / "preprocessor_config.json").is_file()


# --------------------------------------------------------------------------- Qwen3-VL
def test_qwen_predictor_equals_peft_and_the_merged_model(tmp_path, tiny_qwen_dir, images):
    from transformers import AutoModel, Qwen3VLModel

    final = tmp_path / "adapters" / "final"
    base = Qwen3VLModel.from_pretrained(tiny_qwen_dir)
    save_adapter(base.language_model, final / "language", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    save_adapter(base.visual, final / "vision", ["attn.qkv", "attn.proj"])
    predictor = Predictor.from_pretrained(tiny_qwen_dir, final, max_length=256)
    items = [TEXTS[0], {"image": images[0]}, {"text": TEXTS[2], "image": images[1]}]
    ours = predictor.encode(items, role="document", batch_size=2)
    assert ours.shape == (3, 32)
    assert torch.allclose(predictor.encode_image(images[:1]), ours[1:2], atol=1e-5)
    inputs = predictor.embedder.build_inputs(items, "document")
    last = inputs["attention_mask"].sum(1) - 1

    reference = Qwen3VLModel.from_pretrained(tiny_qwen_dir).eval()
    PeftModel.from_pretrained(reference.language_model, str(final / "language"))
    PeftModel.from_pretrained(reference.visual, str(final / "vision"))
    with torch.no_grad():
        hidden = reference(**inputs, use_cache=False).last_hidden_state
    assert torch.allclose(ours, F.normalize(hidden[torch.arange(3), last], dim=-1), atol=1e-5)

    out = predictor.merge_and_save(tmp_path / "merged")
    merged = AutoModel.from_pretrained(out).eval()
    assert type(merged).__name__ == "Qwen3VLModel"
    with torch.no_grad():
        hidden = merged(**inputs, use_cache=False).last_hidden_state
    assert torch.allclose(F.normalize(hidden[torch.arange(3), last], dim=-1), ours, atol=1e-5)
    assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()


# --------------------------------------------------------------------------- a run's own settings
def test_a_runs_adapter_is_encoded_with_the_runs_settings(tmp_path, fast_cfg):
    """A run trained with CLS pooling, prefixes and short queries: the Predictor built from its adapters/final
    alone (no base path, no settings) encodes exactly as the trained module does; a keyword overrides."""
    from lightning_lora.train import run

    _, objects = run(fast_cfg(["model.pooling=cls", "model.query_prefix='query: '", "model.doc_prefix='doc: '",
                               "model.query_max_length=8", "validate_before=false", "validate_after=false"]))
    final = Path(objects["trainer"].default_root_dir) / "adapters" / "final"
    trained = objects["module"].head.embedder.eval()
    with torch.no_grad():
        expected = F.normalize(trained.embed(TEXTS, "query").float(), dim=-1)
        expected_docs = F.normalize(trained.embed(TEXTS, "document").float(), dim=-1)

    predictor = Predictor.from_pretrained(None, final)
    assert predictor.embedder.pooling == "cls" and predictor.embedder.prefixes["query"] == "query: "
    assert torch.allclose(predictor.encode_text(TEXTS), expected, atol=1e-6)
    assert torch.allclose(predictor.encode_text(TEXTS, role="document"), expected_docs, atol=1e-6)
    mean = Predictor.from_pretrained(None, final, pooling="mean")  # the caller's keyword wins
    assert mean.embedder.pooling == "mean" and not torch.allclose(mean.encode_text(TEXTS), expected, atol=1e-3)


def test_an_adapter_outside_a_run_needs_a_base_path(tmp_path, tiny_bert):
    from transformers import AutoModel

    lone = save_adapter(AutoModel.from_pretrained(tiny_bert, add_pooling_layer=False), tmp_path / "lone",
                        ["query", "value"])
    with pytest.raises(UserError, match="base_path is required"):
        Predictor.from_pretrained(None, lone)
    assert Predictor.from_pretrained(tiny_bert, lone).embedder.pooling == "mean"
