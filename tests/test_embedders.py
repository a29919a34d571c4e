"""The embedders (text, CLIP, Qwen3-VL) on tiny local folders: shapes, determinism, modalities, pooling, the
prompt format, LoRA placement per tower, errors, and the shipped model presets' embedder nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from lightning_lora.errors import UserError
from lightning_lora.models.embedders import (
    ClipEmbedder,
    Qwen3VLEmbedder,
    TextEmbedder,
    as_input,
    build_embedder,
    detect_family,
    item_key,
    last_token_index,
    pool,
)

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="module")
def clip(tiny_clip_dir) -> ClipEmbedder:
    return ClipEmbedder(str(tiny_clip_dir)).eval()


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir) -> Qwen3VLEmbedder:
    return Qwen3VLEmbedder(str(tiny_qwen_dir), max_length=256).eval()


# --------------------------------------------------------------------------- pooling and items
def test_pool_numbers_and_last_token_with_right_and_left_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # row 0: 0..3, row 1: 4..7
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert last_token_index(right).tolist() == [2, 0]
    assert pool(hidden, right, "last").flatten().tolist() == [2.0, 4.0]
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])
    assert pool(hidden, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(hidden, right, "mean").flatten().tolist() == [1.0, 4.0]
    assert pool(hidden, right, "cls").flatten().tolist() == [0.0, 4.0]
    with pytest.raises(UserError, match="pooling='max' is unknown"):
        pool(hidden, right, "max")


def test_items_are_checked_and_hashable_keys():
    assert as_input("a").text == "a" and as_input({"image": "x.png"}).modality == "image"
    assert as_input({"text": "t", "image": "x.png"}).modality == "image+text"
    with pytest.raises(UserError, match="unknown key 'video'.*not supported"):
        as_input({"video": "v.mp4"})
    with pytest.raises(UserError, match="'image' must be a file path or a PIL image"):
        as_input({"image": 3})
    assert item_key({"text": "t", "image": Path("a.png")}) == item_key({"text": "t", "image": "a.png"})
    assert hash(item_key({"text": None, "image": "a.png"}))


# --------------------------------------------------------------------------- text
def test_text_embedder_equals_masked_mean_of_the_encoder(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    emb = TextEmbedder(str(tiny_bert), query_prefix="q: ", query_max_length=16).eval()
    texts = ["a short one", "a somewhat longer sentence with more tokens in it", {"text": "mapping form"}]
    with torch.no_grad():
        out = emb.embed(texts, role="query")
        again = emb.embed(texts, role="query")
        doc = emb.embed(texts[:1], role="document")
    assert out.shape == (3, 32) and out.dtype == torch.float32
    assert torch.equal(out, again)
    base = AutoModel.from_pretrained(tiny_bert, add_pooling_layer=False).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tok(["q: a short one", "q: a somewhat longer sentence with more tokens in it", "q: mapping form"],
                padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        hidden = base(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(out, (hidden * mask).sum(1) / mask.sum(1), atol=1e-6)
    assert not torch.allclose(doc, out[:1])  # the document side has no prefix
    assert "pooler" not in dict(emb.encoder.named_children())
    assert emb.default_targets() == {"encoder": ["query", "key", "value", "dense"]}
    assert emb.default_submodules(vision=True) == ["encoder"]
    with pytest.raises(UserError, match="embeds text only"):
        emb.embed([{"text": "x", "image": "a.png"}])


# --------------------------------------------------------------------------- CLIP
def test_clip_text_and_image_features_match_clipmodel(clip, tiny_clip_dir, pictures):
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    items = ["a handwritten digit 3", {"image": pictures[0]}, {"text": "seven", "image": None}, {"image": pictures[1]}]
    with torch.no_grad():
        out = clip.embed(items, "query")
        assert torch.equal(out, clip.embed(items, "document"))  # no prefixes: roles alike
    assert out.shape == (4, 16)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tok = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    proc = CLIPImageProcessorPil.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        text = model.get_text_features(**tok(["a handwritten digit 3", "seven"], padding=True,
                                              return_tensors="pt")).pooler_output
        pixels = proc(images=[Image.open(p).convert("RGB") for p in pictures[:2]], return_tensors="pt")
        image = model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
    assert torch.allclose(out[[0, 2]], text, atol=1e-6)
    assert torch.allclose(out[[1, 3]], image, atol=1e-6)
    assert clip.logit_scale is None and clip.embedding_dim == 16


def test_clip_image_plus_text_is_an_error_unless_mean(clip, tiny_clip_dir, pictures):
    with pytest.raises(UserError, match="CLIP embeds one modality per item"):
        clip.embed([{"text": "a cat", "image": pictures[0]}])
    mean = ClipEmbedder(str(tiny_clip_dir), multimodal="mean", learnable_logit_scale=True)
    with torch.no_grad():
        both = mean.embed([{"text": "a cat", "image": pictures[0]}])
        parts = mean.embed(["a cat", {"image": pictures[0]}])
    assert torch.allclose(both[0], F.normalize(parts, dim=-1).mean(0), atol=1e-6)
    assert isinstance(mean.logit_scale, torch.nn.Parameter)
    assert mean.logit_scale.item() == pytest.approx(2.6592, abs=1e-4)


def test_clip_text_only_lora_leaves_the_vision_tower_untouched(tiny_clip_dir, pictures):
    from peft import LoraConfig, get_peft_model

    emb = ClipEmbedder(str(tiny_clip_dir)).eval()
    assert emb.default_submodules(vision=False) == ["text"]
    assert emb.default_submodules(vision=True) == ["text", "vision"]
    vision_before = {k: v.clone() for k, v in emb.vision.state_dict().items()}
    with torch.no_grad():
        before = emb.embed(["a cat", {"image": pictures[0]}])
    targets = emb.default_targets()["text"]
    get_peft_model(emb.adaptable_submodules()["text"], LoraConfig(r=4, target_modules=targets,
                                                                  init_lora_weights=False))
    assert not [n for n, _ in emb.vision.named_modules() if "lora" in n]
    assert len([n for n, _ in emb.text.named_modules() if n.endswith("lora_A")]) == 2 * 4
    with torch.no_grad():
        after = emb.embed(["a cat", {"image": pictures[0]}])
    assert not torch.allclose(after[0], before[0])  # the text tower moved
    assert torch.equal(after[1], before[1])  # the image embedding did not
    assert all(torch.equal(v, emb.vision.state_dict()[k]) for k, v in vision_before.items())


# --------------------------------------------------------------------------- Qwen3-VL
def test_qwen_prompt_is_qwen3_vl_embedding_chat_format(qwen):
    x = as_input({"text": "a cat"})
    assert qwen.prompt(x, "query") == (
        "<|im_start|>system\nRetrieve images or text relevant to the user's query.<|im_end|>\n"
        "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "system\nRepresent the user's input.<|im_end|>" in qwen.prompt(x, "document")
    own = as_input({"text": "a", "instruction": "Find the picture"})
    assert "system\nFind the picture.<|im_end|>" in qwen.prompt(own, "query")
    assert qwen.prompt(as_input(""), "document").endswith("user\nNULL<|im_end|>\n<|im_start|>assistant\n")
    with_image = qwen.prompt(as_input({"text": "a cat", "image": "x.png"}), "document", image_tokens=3)
    assert "user\n<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>a cat<|im_end|>" in with_image


def test_qwen_text_image_and_both(qwen, pictures):
    items = ["a handwritten digit 3", {"image": pictures[0]}, {"text": "the digit", "image": pictures[2]},
             {"image": pictures[1]}, ""]
    with torch.no_grad():
        out = qwen.embed(items, "document")
        again = qwen.embed(items, "document")
        singles = torch.cat([qwen.embed([it], "document") for it in items])
        query = qwen.embed(items[:1], "query")
    assert out.shape == (5, 32) and out.dtype == torch.float32
    assert torch.equal(out, again)
    # right padding + causal attention: the last real token does not see the pads, so batching changes nothing
    assert torch.allclose(out, singles, atol=1e-5)
    assert not torch.allclose(query, out[:1], atol=1e-4)  # the instruction differs by role
    inputs = qwen.build_inputs(items, "document")
    assert inputs["input_ids"].shape[0] == 5 and inputs["image_grid_thw"].shape == (3, 3)
    assert int(inputs["mm_token_type_ids"].sum()) == int((inputs["image_grid_thw"].prod(-1) // 4).sum())
    lengths = inputs["attention_mask"].sum(1)
    assert (inputs["attention_mask"][torch.arange(5), lengths - 1] == 1).all()  # right padded
    assert (inputs["input_ids"][inputs["attention_mask"] == 0] == qwen.pad_token_id).all()
    with torch.no_grad():
        hidden = qwen.model(**inputs, use_cache=False).last_hidden_state
    assert torch.equal(hidden[torch.arange(5), lengths - 1], out)


def test_qwen_truncates_only_the_text(tiny_qwen_dir, pictures):
    emb = Qwen3VLEmbedder(str(tiny_qwen_dir), max_length=80)
    inputs = emb.build_inputs(["word " * 100, {"text": "word " * 100, "image": pictures[0]}], "document")
    assert inputs["input_ids"].shape[1] == 80
    text = emb.tokenizer.decode(inputs["input_ids"][1].tolist())
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and "<|vision_end|>word word" in text
    with pytest.raises(UserError, match="max_length=40 leaves no room for text"):
        Qwen3VLEmbedder(str(tiny_qwen_dir), max_length=40).build_inputs(["hello"], "query")


def test_qwen_pixel_bounds_set_the_image_token_count(tiny_qwen_dir, pictures):
    small = Qwen3VLEmbedder(str(tiny_qwen_dir), min_pixels=16 * 16, max_pixels=16 * 16)
    inputs = small.build_inputs([{"image": pictures[2]}], "document")  # 64x64 -> 16x16: 2x2 patches, 1 token
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 2]] and int(inputs["mm_token_type_ids"].sum()) == 1


def test_qwen_default_targets_scope_each_tower(tiny_qwen_dir):
    from peft import LoraConfig, get_peft_model

    emb = Qwen3VLEmbedder(str(tiny_qwen_dir))
    assert emb.default_submodules(vision=False) == ["language"]
    assert emb.default_submodules(vision=True) == ["language", "vision"]
    subs, targets = emb.adaptable_submodules(), emb.default_targets()
    for name in ("language", "vision"):
        get_peft_model(subs[name], LoraConfig(r=2, target_modules=targets[name]))
    lora = {n.rsplit(".lora_A", 1)[0] for n, _ in emb.model.named_modules() if n.endswith("lora_A")}
    assert len([n for n in lora if n.startswith("language_model.")]) == 2 * 7
    vision = sorted(n for n in lora if n.startswith("visual."))
    assert len(vision) == 2 * 4 and all(n.startswith("visual.blocks.") for n in vision)  # no merger, no patch_embed


# --------------------------------------------------------------------------- errors
def test_one_line_errors(tmp_path, tiny_bert, tiny_clip_dir, tiny_qwen_dir, clip, qwen):
    with pytest.raises(UserError, match="no such model folder"):
        ClipEmbedder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no Hugging Face model folder \(config.json\)"):
        Qwen3VLEmbedder(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="needs a 'clip' model but .* model_type='qwen3_vl'"):
        ClipEmbedder(str(tiny_qwen_dir))
    with pytest.raises(UserError, match="needs a 'qwen3_vl' model but .* model_type='bert'"):
        Qwen3VLEmbedder(str(tiny_bert))
    with pytest.raises(UserError, match="holds a 'clip' model; .*use the 'clip' embedder"):
        TextEmbedder(str(tiny_clip_dir))
    missing = tmp_path / "gone.png"
    for emb in (clip, qwen):
        with pytest.raises(UserError, match=f"image file not found: {missing}"):
            emb.embed([{"image": str(missing)}])
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(UserError, match="cannot read image .*bad.png: not a recognised image format"):
        qwen.embed([{"image": str(tmp_path / "bad.png")}])
    with pytest.raises(UserError, match="video is not supported"):
        qwen.embed([{"video": "clip.mp4"}])
    with pytest.raises(UserError, match="role='passage' is unknown"):
        clip.embed(["x"], role="passage")


def test_build_embedder_detects_the_family(tiny_bert, tiny_clip_dir, tiny_qwen_dir):
    assert detect_family(tiny_bert) == "text"
    assert detect_family(tiny_clip_dir) == "clip"
    assert detect_family(tiny_qwen_dir) == "qwen3_vl"
    assert isinstance(build_embedder(tiny_clip_dir), ClipEmbedder)
    with pytest.raises(UserError, match="family='siglip' is unknown"):
        build_embedder(tiny_clip_dir, family="siglip")


# --------------------------------------------------------------------------- presets
@pytest.mark.parametrize(("preset", "tiny", "cls"), [("clip", "clip_tiny", ClipEmbedder),
                                                     ("qwen3_vl_embedding", "qwen3_vl_tiny", Qwen3VLEmbedder)])
def test_model_presets_build_their_embedder(preset, tiny, cls, tiny_clip_dir, tiny_qwen_dir):
    from hydra.utils import instantiate

    folder = tiny_clip_dir if cls is ClipEmbedder else tiny_qwen_dir
    real = OmegaConf.load(CONF / "model" / f"{preset}.yaml")
    small = OmegaConf.load(CONF / "model" / f"{tiny}.yaml")
    # the released preset names its model on the Hub; the tiny one builds its own folder
    released = {"clip": "openai/clip-vit-base-patch32", "qwen3_vl_embedding": "Qwen/Qwen3-VL-Embedding-2B"}
    assert real.pretrained == released[preset] and real.vision is False
    assert real._target_ == "lightning_lora.heads.embedding.EmbeddingHead"
    merged = OmegaConf.merge(real, {k: v for k, v in OmegaConf.to_container(small).items() if k != "defaults"})
    merged.pretrained = str(folder)
    emb = instantiate(merged.embedder)
    assert isinstance(emb, cls) and emb.name == tiny
    assert emb.default_targets() == OmegaConf.to_container(real.embedder.targets)
