"""Publishing (issue 20): ``lightning-lora push`` (dry-run folder and card text, the card's loading code run against
the folder, the upload through ``HfApi`` with the network replaced), the ``PushToHub`` callback, and the
``modelspec.*``/``ss_*`` metadata of the single-file and kohya exports. Offline: nothing reaches the Hub."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from lightning_lora.cli import main as cli_main
from lightning_lora.train import run

pytestmark = pytest.mark.usefixtures("one_thread")

EMBED_REPO = "me/tiny-embed-lora"
SD_REPO = "me/tiny-sd-lora"
TRIGGER = "inkstyle"


def _run(tmp: Path, overrides: list[str]):
    from conftest import compose_train

    cfg = compose_train(overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "run")
    _, objects = run(cfg)
    return tmp / "run", objects["module"]


@pytest.fixture(scope="module")
def embed_pushed(tmp_path_factory, tiny_bert, cache_dir, one_thread):
    """A 2-step run of the default job's model preset on the tiny BERT and 16 pairs, with the push callback on and
    the Hub's network calls replaced: (run dir, module, the calls the callback made)."""
    from conftest import write_pairs

    tmp = tmp_path_factory.mktemp("embed")
    rows = [{"query": f"how to {verb} a {noun}", "positive": f"def {verb}_{noun}(x): return x"}
            for verb in ("sort", "open", "parse", "hash") for noun in ("list", "file", "string", "path")]
    pairs = write_pairs(tmp / "pairs.jsonl", rows)
    with pytest.MonkeyPatch.context() as patch:
        hub = FakeHub(patch)
        run_dir, module = _run(tmp, [
            f"model.pretrained={tiny_bert}", f"paths.cache_dir={cache_dir}", "data=pairs", f"data.train_path={pairs}",
            f"data.val_path={pairs}", "trainer.max_steps=2", "data.batch_size=8", "data.val_batch_size=16",
            "model.query_max_length=16", "model.doc_max_length=32", "model.query_prefix='query: '",
            f"callbacks.push.repo_id={EMBED_REPO}", "callbacks.push.private=true", "~callbacks.progress_bar"])
    return run_dir, module, hub.calls


@pytest.fixture(scope="module")
def embed_run(embed_pushed):
    """(run dir, module) of ``embed_pushed``."""
    return embed_pushed[:2]


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory, cache_dir, one_thread):
    """A 2-step ``experiment=sd_tiny_digits`` run with a trigger phrase and final previews: (run dir, module)."""
    from lightning_lora.models.sd_tiny import ensure_tiny_sd

    tiny = ensure_tiny_sd(tmp_path_factory.mktemp("sd_base") / "sd_tiny")
    return _run(tmp_path_factory.mktemp("sd"), [
        "experiment=sd_tiny_digits", f"model.pretrained={tiny}", f"paths.cache_dir={cache_dir}", "trainer.max_steps=2",
        "data.num_images=24", "data.batch_size=4", "model.previews.seeds=[0]", "model.previews.num_inference_steps=2",
        f"model.trigger={TRIGGER}", "~callbacks.progress_bar"])


def _dry_run(run_dir: Path, repo: str, out: Path, capsys) -> Path:
    rc = cli_main(["push", str(run_dir), repo, "--dry-run", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.strip().splitlines()[-1] == str(out)  # the folder's path is the last line
    return out


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _code_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def _number(v: float) -> str:
    return f"{v:.4f}"


# ---------------------------------------------------------------------------- the dry-run folder and its card
def test_embedding_dry_run_folder_and_card(embed_run, tmp_path, capsys, tiny_bert):
    from huggingface_hub import ModelCard, metadata_load

    run_dir, _ = embed_run
    folder = _dry_run(run_dir, EMBED_REPO, tmp_path / "out", capsys)
    assert _files(folder) == ["README.md", "encoder/adapter_config.json", "encoder/adapter_model.safetensors",
                              "model/adapter_config.json", "model/adapter_model.safetensors", "model/whole_model.json"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = "\n".join(f"| {k} | {_number(metrics['before'][k])} | {_number(v)} |" for k, v in metrics["after"].items())
    expected = f"""---
library_name: peft
tags:
- lora
- embedding
- lightning-lora
---

# embedding LoRA

A LoRA adapter for `{tiny_bert}` (embedding family, `EmbeddingHead`), trained with lightning_lora.
No license is set: add `license:` to the metadata above before sharing.

## What was trained

| | |
| --- | --- |
| base model | `{tiny_bert}` |
| family | embedding |
| dataset | PairsDataModule |
| steps | 2 |
| trainable parameters | {metrics['trainable_params']:,} |

| submodule | r | alpha | targets |
| --- | --- | --- | --- |
| encoder | 8 | 16.0 | dense, key, query, value |

## Results

Validation before and after training:

| metric | before | after |
| --- | --- | --- |
{rows}

## Files

- `encoder/adapter_config.json`
- `encoder/adapter_model.safetensors`
- `model/adapter_config.json`
- `model/adapter_model.safetensors`
- `model/whole_model.json`

## Use

### lightning_lora Predictor

```python
from lightning_lora.predict import Predictor

predictor = Predictor.from_pretrained("{tiny_bert}", "{EMBED_REPO}", family="text", doc_max_length=32, \
doc_prefix='', pooling='mean', query_max_length=16, query_prefix='query: ')
queries = predictor.encode_text(["read a file line by line"], role="query")
documents = predictor.encode_text(["def read_lines(path): ..."], role="document")
scores = queries @ documents.T
```

### PEFT

```python
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{tiny_bert}")
model = PeftModel.from_pretrained(AutoModel.from_pretrained("{tiny_bert}"), "{EMBED_REPO}", subfolder="model")
# embeddings: pool the last hidden state as the run did (mean), then L2-normalise
```
"""
    card = (folder / "README.md").read_text()
    assert card == expected
    header = metadata_load(folder / "README.md")
    assert header == {"library_name": "peft", "tags": ["lora", "embedding", "lightning-lora"]}  # local base: none
    assert ModelCard.load(folder / "README.md").data.library_name == "peft"


def test_sd_dry_run_folder_and_card(sd_run, tmp_path, capsys):
    from huggingface_hub import ModelCard, metadata_load

    run_dir, module = sd_run
    folder = _dry_run(run_dir, SD_REPO, tmp_path / "out", capsys)
    assert _files(folder) == ["README.md", "images/base.png", "images/step_0000002.png", "lora_weights.pth",
                              "pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors",
                              "unet/adapter_config.json", "unet/adapter_model.safetensors"]
    assert (folder / "images/step_0000002.png").read_bytes() == (run_dir / "samples/step_0000002.png").read_bytes()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    base = module.head.pretrained
    loss = metrics["after"]["val/loss"]
    expected = f"""---
library_name: diffusers
tags:
- lora
- diffusion
- lightning-lora
---

# diffusion LoRA

A LoRA adapter for `{base}` (diffusion family, `DiffusionHead`), trained with lightning_lora.
No license is set: add `license:` to the metadata above before sharing.

## What was trained

| | |
| --- | --- |
| base model | `{base}` |
| family | diffusion |
| dataset | DigitCaptionsDataModule |
| steps | 2 |
| trainable parameters | 30,720 |
| trigger phrase | `{TRIGGER}` |

| submodule | r | alpha | targets |
| --- | --- | --- | --- |
| unet | 8 | 16.0 | to_k, to_out.0, to_q, to_v |

## Results

Validation before and after training:

| metric | before | after |
| --- | --- | --- |
| val/loss | {_number(metrics['before']['val/loss'])} | {_number(loss)} |

## Previews

![base model](images/base.png)
![with this LoRA](images/step_0000002.png)

## Files

- `images/base.png`
- `images/step_0000002.png`
- `lora_weights.pth`
- `pytorch_lora_weights.safetensors`
- `pytorch_lora_weights_kohya.safetensors`
- `unet/adapter_config.json`
- `unet/adapter_model.safetensors`

## Use

### diffusers

```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base}", safety_checker=None, requires_safety_checker=False)
pipe.load_lora_weights("{SD_REPO}", weight_name="pytorch_lora_weights.safetensors")
# A1111 / ComfyUI / kohya tools: pytorch_lora_weights_kohya.safetensors (kohya keys, modelspec.* and ss_* metadata)
image = pipe("{TRIGGER}, a handwritten digit 3", height=32, width=32, num_inference_steps=2, \
generator=torch.Generator().manual_seed(0)).images[0]
image.save("lora.png")
```

### PEFT

```python
from diffusers import UNet2DConditionModel
from peft import PeftModel

unet = UNet2DConditionModel.from_pretrained("{base}", subfolder="unet")
unet = PeftModel.from_pretrained(unet, "{SD_REPO}", subfolder="unet")
```
"""
    card = (folder / "README.md").read_text()
    assert card == expected
    assert metadata_load(folder / "README.md") == {"library_name": "diffusers",
                                                   "tags": ["lora", "diffusion", "lightning-lora"]}
    assert ModelCard.load(folder / "README.md").data.tags == ["lora", "diffusion", "lightning-lora"]


def test_a_hub_base_is_named_in_the_header(sd_run, tmp_path, capsys):
    """A base that came from the Hub is the card's ``base_model`` (what lists the LoRA under its base model)."""
    import shutil

    from huggingface_hub import metadata_load

    run_dir, _ = sd_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(re.sub(r"(?m)^  pretrained: .*$", "  pretrained: someone/tiny-sd@main", config))
    folder = _dry_run(copy, SD_REPO, tmp_path / "out", capsys)
    assert metadata_load(folder / "README.md")["base_model"] == "someone/tiny-sd"
    assert 'from_pretrained("someone/tiny-sd", subfolder="unet")' in (folder / "README.md").read_text()


# ---------------------------------------------------------------------------- the card's code, run
def test_embedding_card_code_reproduces_the_module(embed_run, tmp_path, capsys, monkeypatch):
    from lightning_lora.models.embedders import pool

    run_dir, module = embed_run
    folder = _dry_run(run_dir, EMBED_REPO, tmp_path / "out", capsys)
    blocks = _code_blocks((folder / "README.md").read_text())
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    texts = ["open a file and read it", "sort a list of numbers"]
    module.eval()
    with torch.no_grad():
        want_q = torch.nn.functional.normalize(module.head.embedder.embed(texts, "query").float(), dim=-1)
        want_d = torch.nn.functional.normalize(module.head.embedder.embed(texts, "document").float(), dim=-1)
    predictor_ns: dict = {}
    exec(blocks[0].replace(EMBED_REPO, str(folder)), predictor_ns)  # the card's code, on the local folder
    predictor = predictor_ns["predictor"]
    torch.testing.assert_close(predictor.encode_text(texts, role="query"), want_q, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(predictor.encode_text(texts, role="document"), want_d, atol=1e-5, rtol=1e-4)
    assert predictor_ns["scores"].shape == (1, 1)
    peft_ns: dict = {}
    exec(blocks[1].replace(EMBED_REPO, str(folder)), peft_ns)
    tokens = peft_ns["tokenizer"](["query: " + t for t in texts], padding=True, truncation=True, max_length=16,
                                  return_tensors="pt")
    with torch.no_grad():
        hidden = peft_ns["model"].eval()(**tokens).last_hidden_state
    got = torch.nn.functional.normalize(pool(hidden, tokens["attention_mask"], "mean").float(), dim=-1)
    torch.testing.assert_close(got, want_q, atol=1e-5, rtol=1e-4)


def _unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    sample = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    text = torch.randn(1, 4, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([10]), encoder_hidden_states=text).sample


def test_sd_card_code_reproduces_the_module(sd_run, tmp_path, capsys, monkeypatch):
    run_dir, module = sd_run
    folder = _dry_run(run_dir, SD_REPO, tmp_path / "out", capsys)
    blocks = _code_blocks((folder / "README.md").read_text())
    assert len(blocks) == 2
    module.eval()
    want = _unet_out(module.adapters["unet"])
    monkeypatch.chdir(tmp_path)
    diffusers_ns: dict = {}
    exec(blocks[0].replace(SD_REPO, str(folder)), diffusers_ns)
    assert (tmp_path / "lora.png").is_file()  # the card's picture was drawn
    torch.testing.assert_close(_unet_out(diffusers_ns["pipe"].unet), want, atol=1e-5, rtol=1e-4)
    with module.adapters["unet"].disable_adapter():
        assert (_unet_out(module.adapters["unet"]) - want).abs().max() > 1e-6  # the LoRA changes the output
    peft_ns: dict = {}
    exec(blocks[1].replace(SD_REPO, str(folder)), peft_ns)
    torch.testing.assert_close(_unet_out(peft_ns["unet"].eval()), want, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- the upload, network replaced
class FakeHub:
    """``HfApi``'s network calls replaced (on the class: every instance) by methods of this recorder, which keep
    what each is handed (the folder's files at call time)."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi

        self.calls: list[tuple[str, dict]] = []
        monkeypatch.setattr(HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(HfApi, "create_branch", self.create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", self.upload_folder)
        monkeypatch.setattr("lightning_lora.hub.offline", lambda: False)

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        kwargs["files"] = {name: (folder / name).read_bytes() for name in _files(folder)}
        self.calls.append(("upload_folder", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"


def test_push_hands_the_folder_to_the_hub_api(sd_run, tmp_path, capsys, monkeypatch):
    run_dir, _ = sd_run
    hub = FakeHub(monkeypatch)
    rc = cli_main(["push", str(run_dir), SD_REPO, "--private", "--revision", "v1", "--commit-message", "first",
                   "--token", "hf_test"])
    out = capsys.readouterr().out
    assert rc == 0 and out.strip().endswith(f"https://huggingface.co/{SD_REPO}/commit/abc")
    assert [name for name, _ in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][1] == {"repo_id": SD_REPO, "private": True, "repo_type": "model", "exist_ok": True}
    assert hub.calls[1][1] == {"repo_id": SD_REPO, "branch": "v1", "repo_type": "model", "exist_ok": True}
    upload = hub.calls[2][1]
    assert (upload["repo_id"], upload["revision"], upload["commit_message"], upload["repo_type"]) == (
        SD_REPO, "v1", "first", "model")
    snapshot = run_dir / "adapters" / "final"
    assert sorted(upload["files"]) == ["README.md", "images/base.png", "images/step_0000002.png",
                                       *sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*")
                                               if p.is_file())]
    kohya = "pytorch_lora_weights_kohya.safetensors"
    assert upload["files"][kohya] == (snapshot / kohya).read_bytes()
    assert "# diffusion LoRA" in upload["files"]["README.md"].decode()


def test_push_without_revision_uses_main_and_public(embed_run, capsys, monkeypatch):
    run_dir, _ = embed_run
    hub = FakeHub(monkeypatch)
    assert cli_main(["push", str(run_dir), EMBED_REPO]) == 0
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1]["private"] is False and hub.calls[1][1]["revision"] is None


@pytest.mark.parametrize("case", ["no run dir", "not a run", "no snapshot", "bad repo id", "offline",
                                  "full fine-tune"])
def test_push_mistakes_are_one_line_before_any_network(case, embed_run, tmp_path, capsys, monkeypatch):
    from helpers import assert_one_error_line
    from huggingface_hub import HfApi

    def network(*args, **kwargs):
        raise AssertionError("the network was reached")

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, name, network)
    run_dir, _ = embed_run
    full = tmp_path / "full_run"  # the same run as if trained with adapter.enabled=false
    if case == "full fine-tune":
        import shutil

        from omegaconf import OmegaConf

        shutil.copytree(run_dir, full)
        config = OmegaConf.load(full / "config.yaml")
        config.adapter.enabled = False
        OmegaConf.save(config, full / "config.yaml")
    argv, needle = {
        "no run dir": ([str(tmp_path / "nope"), EMBED_REPO], "no such directory"),
        "not a run": ([str(tmp_path), EMBED_REPO], "is not a run directory"),
        "no snapshot": ([str(run_dir), EMBED_REPO, "--snapshot", "step_0000099"], "has no such snapshot; it has "),
        "bad repo id": ([str(run_dir), "me/bad repo"], "'me/bad repo' is not valid on the Hub"),
        "offline": ([str(run_dir), EMBED_REPO], "offline (HF_HUB_OFFLINE=1)"),
        "full fine-tune": ([str(full), EMBED_REPO], "was trained without LoRA (adapter.enabled=false)"),
    }[case]
    rc = cli_main(["push", *argv])
    assert_one_error_line(rc, capsys.readouterr().err, needle, case=case)


# ---------------------------------------------------------------------------- the callback
def test_push_callback_pushes_after_metrics_json(embed_pushed):
    """``callbacks.push.repo_id=...``: the run pushes its final snapshot once, after ``metrics.json`` (the card shows
    the results), with the callback's settings."""
    run_dir, _, calls = embed_pushed
    assert [name for name, _ in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1]["repo_id"] == EMBED_REPO and calls[0][1]["private"] is True
    card = calls[1][1]["files"]["README.md"].decode()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"| val/loss | {_number(metrics['before']['val/loss'])} | {_number(metrics['after']['val/loss'])} |" in card
    assert sorted(calls[1][1]["files"]) == ["README.md", "encoder/adapter_config.json",
                                            "encoder/adapter_model.safetensors", "model/adapter_config.json",
                                            "model/adapter_model.safetensors", "model/whole_model.json"]


def test_push_callback_after_the_run(embed_run, capsys, monkeypatch):
    from lightning_lora.callbacks import PushToHub

    run_dir, _ = embed_run
    assert PushToHub().on_run_end(run_dir) is None  # repo_id null: off
    callback = PushToHub(repo_id=EMBED_REPO, private=True)
    assert callback.on_run_end(run_dir) is None  # offline: one line, the run is kept
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"push: offline (HF_HUB_OFFLINE=1), {EMBED_REPO} not updated; later: lightning-lora push "
                   f"{run_dir} {EMBED_REPO} --snapshot final"]
    hub = FakeHub(monkeypatch)
    assert callback.on_run_end(run_dir) == f"https://huggingface.co/{EMBED_REPO}/commit/abc"
    assert hub.calls[0][1]["private"] is True and "README.md" in hub.calls[-1][1]["files"]


def test_push_callback_refuses_a_full_fine_tune_before_anything_loads(tmp_path, capsys):
    from helpers import assert_one_error_line, train_main

    rc = train_main(["callbacks.push.repo_id=me/x", "adapter.enabled=false", f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_error_line(rc, capsys.readouterr().err,
                          "callbacks.push.repo_id=me/x cannot push a run with adapter.enabled=false")
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing of the run was written


def test_push_callback_repo_id_is_checked_before_anything_loads(tmp_path, capsys):
    from helpers import assert_one_error_line, file_bytes, train_main

    rc = train_main(["callbacks.push.repo_id=me/x--y", f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_error_line(rc, capsys.readouterr().err,
                          "callbacks.push.repo_id=me/x--y is not a valid Hub repository id: Cannot have -- or ..")
    assert sorted(file_bytes(tmp_path / "run")) == [".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml",
                                                    "train.log"]  # Hydra's own: no model, no data was read


# ---------------------------------------------------------------------------- metadata other tools read
def test_kohya_file_carries_modelspec_and_training_keys(sd_run):
    from safetensors import safe_open

    run_dir, _ = sd_run
    with safe_open(run_dir / "adapters/final/pytorch_lora_weights_kohya.safetensors", "pt") as f:
        meta = f.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    date = meta.pop("modelspec.date")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", date)
    assert meta == {
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "lightning_lora (PEFT LoRA)", "modelspec.title": "sd_tiny LoRA (run)",
        "modelspec.resolution": "32x32", "modelspec.trigger_phrase": TRIGGER,
        "ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "16",
        "ss_network_dropout": "0.0", "ss_network_args": '{"init": "kaiming"}', "ss_learning_rate": "0.001",
        "ss_max_train_steps": "2", "ss_steps": "2", "ss_batch_size_per_device": "4", "ss_lr_scheduler": "constant",
        "ss_gradient_accumulation_steps": "1", "ss_mixed_precision": "32-true", "ss_seed": "42",
        "ss_sd_model_name": "sd_tiny", "ss_base_model_version": "sd_v1", "ss_output_name": "sd_tiny"}


def test_kohya_and_diffusers_files_still_load(sd_run):
    """diffusers loads the kohya file (with its new metadata) and our readers read it as before."""
    from diffusers import StableDiffusionPipeline

    from lightning_lora.adapters.formats import read_lora

    run_dir, module = sd_run
    kohya = run_dir / "adapters/final/pytorch_lora_weights_kohya.safetensors"
    lora = read_lora(kohya)
    peft = read_lora(run_dir / "adapters/final")
    assert lora.format == "kohya" and len(lora.modules) == len(peft.modules) == 32
    assert {f.rank for f in lora.modules.values()} == {8} and {f.scale for f in lora.modules.values()} == {2.0}
    pipe = StableDiffusionPipeline.from_pretrained(module.head.pretrained, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    module.eval()
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(module.adapters["unet"]), atol=1e-5, rtol=1e-4)


def test_single_file_carries_modelspec_and_reads_back(embed_run, tmp_path):
    from safetensors import safe_open

    from lightning_lora.adapters import read_adapters
    from lightning_lora.adapters.formats import read_lora

    run_dir, module = embed_run
    path = module.save_adapter_file(tmp_path / "adapter.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "embedding/lora" and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["ss_network_module"] == "peft.tuners.lora" and meta["ss_max_train_steps"] == "2"
    assert meta["ss_learning_rate"] == "0.001" and meta["ss_batch_size_per_device"] == "8"
    assert "modelspec.resolution" not in meta and "modelspec.trigger_phrase" not in meta  # text, no trigger
    assert meta["lightning_lora.format"] == "1" and meta["family"] == "embedding"  # its own description kept
    configs, family = read_adapters(path)
    assert family == "embedding" and configs["encoder"][0].r == 8
    assert len(read_lora(path).modules) == len(read_lora(run_dir / "adapters/final").modules)


def test_extract_writes_modelspec(tmp_path):
    from helpers import net_pair
    from safetensors import safe_open
    from safetensors.torch import save_file

    base, tuned = net_pair()
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    out = tmp_path / "x.safetensors"
    assert cli_main(["extract", "--base", str(tmp_path / "base.safetensors"), "--tuned",
                     str(tmp_path / "tuned.safetensors"), "--out", str(out), "--rank", "4", "--family", "toy"]) == 0
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert (meta["modelspec.title"], meta["modelspec.architecture"]) == ("x", "toy/lora")


def test_trellis_push_takes_its_lora_ckpts_pair(tmp_path, capsys):
    """A TRELLIS run's snapshot is uploaded with the ``lora_ckpts/`` files of its step (written outside it), and
    the card shows the LoRA fork's loading code with the snapshot's r/alpha/targets (a run directory laid out by
    hand: no model is needed to publish)."""
    run_dir = tmp_path / "run"
    snapshot = run_dir / "adapters" / "final"
    (snapshot / "denoiser").mkdir(parents=True)
    (snapshot / "denoiser" / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "lora_alpha": 8, "target_modules": ["to_out", "to_q"], "peft_type": "LORA"}))
    (snapshot / "denoiser" / "adapter_model.safetensors").write_bytes(b"weights")
    (run_dir / "lora_ckpts").mkdir()
    for step in (3, 5):
        for suffix in (".safetensors", ".pt"):
            (run_dir / "lora_ckpts" / f"denoiser_lora_step{step:07d}{suffix}").write_bytes(b"%d" % step)
    (run_dir / "config.yaml").write_text("model:\n  _target_: lightning_lora.heads.flow3d.FlowMatching3DHead\n"
                                         "  name: trellis_slat_tiny\n  ckpt: /models/slat.safetensors\n")
    (run_dir / "metrics.json").write_text(json.dumps({"global_step": 5, "trainable_params": 10}))
    folder = _dry_run(run_dir, "me/trellis-lora", tmp_path / "out", capsys)
    assert _files(folder) == ["README.md", "denoiser/adapter_config.json", "denoiser/adapter_model.safetensors",
                              "denoiser_lora_step0000005.pt", "denoiser_lora_step0000005.safetensors"]
    card = (folder / "README.md").read_text()
    assert "model = get_peft_model(denoiser, LoraConfig(r=4, lora_alpha=8, target_modules=['to_out', 'to_q']))" in card
    assert 'torch.load(hf_hub_download("me/trellis-lora", "denoiser_lora_step0000005.pt"), weights_only=True)' in card
    assert "| denoiser | 4 | 8 | to_out, to_q |" in card and "| steps | 5 |" in card


def test_base_hash_only_for_a_base_that_is_one_file(tmp_path):
    """kohya's ``ss_new_sd_model_hash`` is the SHA-256 of the whole checkpoint file: written for a base that is one
    file, left out for a folder (a hash of one part of it would match no file a tool knows)."""
    import hashlib

    from lightning_lora.adapters.metadata import file_sha256, training_keys

    base = tmp_path / "base.safetensors"
    base.write_bytes(b"weights" * 1000)
    keys = training_keys(learning_rate=1e-4, sd_model_name="base", new_sd_model_hash=file_sha256(base))
    assert keys == {"ss_learning_rate": "0.0001", "ss_sd_model_name": "base",
                    "ss_new_sd_model_hash": hashlib.sha256(base.read_bytes()).hexdigest()}
    assert file_sha256(tmp_path) is None and file_sha256(None) is None


def test_card_shows_the_adaptation_report(sd_run, tmp_path, capsys):
    """``metrics.json``'s ``adaptation`` block (a demo's judge) becomes its own table, and ``before_after.png`` is
    uploaded and embedded."""
    import shutil

    run_dir, _ = sd_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["adaptation"] = {"metric": "red style share", "before": 0.0, "after": 0.94,
                             "digit_accuracy": {"before": 1.0, "after": 0.98}}
    (copy / "metrics.json").write_text(json.dumps(metrics))
    shutil.copy(copy / "samples/base.png", copy / "samples/before_after.png")
    folder = _dry_run(copy, SD_REPO, tmp_path / "out", capsys)
    card = (folder / "README.md").read_text()
    assert ("A measure other than the loss, before and after training:\n\n| measure | before | after |\n"
            "| --- | --- | --- |\n| red style share | 0.0000 | 0.9400 |\n"
            "| digit_accuracy | 1.0000 | 0.9800 |\n") in card
    assert "![before (top) and after (bottom) training](images/before_after.png)" in card
    assert (folder / "images/before_after.png").read_bytes() == (copy / "samples/before_after.png").read_bytes()
