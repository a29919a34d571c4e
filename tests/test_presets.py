"""Model presets bring their data: every ``model=X`` composes with the data it trains on, ``data=...`` on the command
line wins, TRELLIS data follows the model's latent, and a model/data pair that cannot work stops in one line
before anything loads (in process for every pair, through the real CLI for one)."""

from __future__ import annotations

import pytest
from conftest import REPO, compose_train, run_cli
from families import RUN
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from lightning_lora.config import CONFIG_NAME, config_dir
from lightning_lora.errors import UserError
from lightning_lora.train import _user_error, check_model_takes_data, run

# the data each model preset names, and the data options each kind of head can train on (written out here, not
# derived from the code under test)
PRESET_DATA = {
    "minilm": "code_search", "hf_encoder": "pairs", "clip": "image_pairs", "clip_tiny": "digits_retrieval",
    "qwen3_vl_embedding": "image_pairs", "qwen3_vl_tiny": "digits_retrieval", "sd15": "image_folder",
    "sd_tiny": "digits", "sd_digits_base": "styled_digits", "sdxl": "image_folder", "sdxl_tiny": "digits",
    "lbm": "paired_shards", "lbm_tiny": "digits_pairs", "lbm_digits_base": "digits_pairs", "trellis_ss": "trellis",
    "trellis_slat": "trellis", "trellis_ss_tiny": "trellis_demo", "trellis_slat_tiny": "trellis_demo",
    "trellis_ss_demo": "trellis_shapes", "trellis_slat_demo": "trellis_patterns",
}
TEXT, IMAGE_TEXT = ("code_search", "pairs"), ("code_search", "digits_retrieval", "image_pairs", "pairs")
CAPTIONED = ("digits", "dreambooth", "hf_dataset", "image_folder", "styled_digits", "webdataset")
TAKES = {
    "minilm": TEXT, "hf_encoder": TEXT, "clip": IMAGE_TEXT, "clip_tiny": IMAGE_TEXT, "qwen3_vl_embedding": IMAGE_TEXT,
    "qwen3_vl_tiny": IMAGE_TEXT, "sd15": CAPTIONED, "sd_tiny": CAPTIONED, "sd_digits_base": CAPTIONED,
    "sdxl": CAPTIONED, "sdxl_tiny": CAPTIONED,
    "lbm": ("digits_pairs", "paired_shards"),
    "lbm_tiny": ("digits_pairs", "paired_shards"), "lbm_digits_base": ("digits_pairs", "paired_shards"),
    **{m: ("trellis", "trellis_demo", "trellis_patterns") for m in ("trellis_slat", "trellis_slat_tiny",
                                                                    "trellis_slat_demo")},
    **{m: ("trellis", "trellis_demo", "trellis_shapes") for m in ("trellis_ss", "trellis_ss_tiny", "trellis_ss_demo")},
}
HEADS = {**{m: "EmbeddingHead" for m in ("minilm", "hf_encoder", "clip", "clip_tiny", "qwen3_vl_embedding",
                                          "qwen3_vl_tiny")},
         "sd15": "DiffusionHead", "sd_tiny": "DiffusionHead", "sd_digits_base": "DiffusionHead", "lbm": "BridgeHead",
         "sdxl": "SDXLHead", "sdxl_tiny": "SDXLHead",
         "lbm_tiny": "BridgeHead", "lbm_digits_base": "BridgeHead",
         **{m: "FlowMatching3DHead" for m in ("trellis_ss", "trellis_slat", "trellis_ss_tiny", "trellis_slat_tiny",
                                              "trellis_ss_demo", "trellis_slat_demo")}}
DATA_OPTIONS = sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml"))
# The released TRELLIS presets condition on images, encoded by the model's DINOv2: a stand-in value (nothing loads)
ENCODER = {m: ["model.image_encoder.pretrained=dinov2"] for m in ("trellis_ss", "trellis_slat")}
# the tiny presets at the sizes of a short run: no data= (the preset brings it), only smaller sets
SMALL = {**{m: ["data.num_images=40", "data.batch_size=4"] for m in ("sd_tiny", "lbm_tiny")},
         **{m: ["data.num_shapes=24", "data.batch_size=2"] for m in ("trellis_ss_tiny", "trellis_slat_tiny")},
         **{m: ["data.num_images=48", "data.batch_size=8"] for m in ("clip_tiny", "qwen3_vl_tiny")}}


def test_the_tables_cover_every_shipped_model_preset() -> None:
    shipped = {p.stem for p in (REPO / "conf" / "model").glob("*.yaml") if not p.stem.startswith("_")}
    assert shipped == set(PRESET_DATA) == set(TAKES) == set(HEADS)


@pytest.mark.parametrize("model", sorted(PRESET_DATA))
def test_every_model_preset_composes_with_its_own_data(model: str) -> None:
    cfg = compose_train([f"model={model}", *ENCODER.get(model, [])])
    own = compose_train([f"data={PRESET_DATA[model]}"]).data._target_
    assert cfg.data._target_ == own
    check_model_takes_data(cfg)  # and the pair fits


def test_data_on_the_command_line_wins_in_either_order() -> None:
    for overrides in (["model=sd_tiny", "data=webdataset"], ["data=webdataset", "model=sd_tiny"]):
        assert compose_train(overrides).data._target_.endswith("WebDatasetDataModule")
    # an experiment's data wins over its model preset's too (both are defaults lists; the overlay is the user's)
    cfg = compose_train(["experiment=lbm_tiny_digits"])
    assert cfg.data._target_.endswith("DigitTranslationDataModule")
    assert compose_train(["experiment=lbm_tiny_digits", "data=paired_shards"]).data._target_.endswith(
        "PairedShardsDataModule")


def test_trellis_data_follows_the_models_latent() -> None:
    assert compose_train(["model=trellis_ss_tiny"]).data.kind == "ss"
    assert compose_train(["model=trellis_slat_tiny"]).data.kind == "slat"
    assert compose_train(["model=trellis_ss", "data=trellis_demo"]).data.kind == "ss"
    assert compose_train(["model=trellis_ss_tiny", "data=trellis"]).data.kind == "ss"
    assert compose_train(["model=trellis_ss_tiny", "data.kind=slat"]).data.kind == "slat"  # the command line wins
    with pytest.raises(Exception) as info:  # a latent that does not fit the denoiser
        from hydra.utils import instantiate

        instantiate(compose_train(["model=trellis_ss_tiny", "model.latent=slat"]).model)
    assert "model.latent=slat but model.denoiser is a SparseStructureFlowModel" in str(_user_error(info.value))


@pytest.mark.parametrize("model", sorted(SMALL))
def test_tiny_presets_train_two_steps_with_the_data_they_bring(model: str, tmp_path, cache_dir) -> None:
    cfg = compose_train([f"model={model}", f"paths.cache_dir={cache_dir}", *SMALL[model], *RUN])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    metrics, objects = run(cfg)
    assert metrics["global_step"] == 2
    assert type(objects["datamodule"]).__name__ == cfg.data._target_.rsplit(".", 1)[-1]


@pytest.mark.parametrize("model", ["sd15", "sdxl", "lbm", "hf_encoder", "clip", "qwen3_vl_embedding", "trellis_ss",
                                   "trellis_slat"])
def test_real_presets_stop_in_one_line_at_the_data_path_they_need(model: str, tmp_path) -> None:
    need = {"sd15": "data.train_dir", "sdxl": "data.train_dir", "lbm": "data.train_shards", "trellis_ss": "data.roots",
            "trellis_slat": "data.roots"}.get(model, "data.train_path")
    cfg = compose_train([f"model={model}", *ENCODER.get(model, [])])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(UserError, match=f"^{need} is required: pass {need}=<value> on the command line$"):
        run(cfg)


def test_every_pair_that_cannot_work_stops_before_anything_loads(monkeypatch) -> None:
    """Every shipped model preset against every shipped data option: the pairs outside TAKES stop in run(cfg) with
    one line naming both sides and the data options the model takes, before any config value is instantiated."""
    import lightning_lora.train as train

    def nothing_loads(*args, **kwargs):
        raise AssertionError("something was instantiated before the pair was checked")

    monkeypatch.setattr(train, "instantiate", nothing_loads)
    monkeypatch.setattr(train.pl, "seed_everything", nothing_loads)
    checked = 0
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        for model in sorted(TAKES):
            for data in DATA_OPTIONS:
                cfg = compose(CONFIG_NAME, [f"model={model}", f"data={data}", *ENCODER.get(model, [])])
                if data in TAKES[model]:
                    check_model_takes_data(cfg)
                    continue
                with pytest.raises(UserError) as info:
                    run(cfg)
                message = str(info.value)
                options = ", ".join(f"data={name}" for name in TAKES[model])
                assert f"({HEADS[model]}) cannot train on data={data} (" in message, message
                assert message.endswith(f"; data options it takes: {options}"), message
                assert "\n" not in message
                checked += 1
    assert checked == len(TAKES) * len(DATA_OPTIONS) - sum(len(v) for v in TAKES.values())


def test_a_mismatched_pair_stops_the_cli_before_anything_is_built_with_one_line(tmp_path) -> None:
    # "Early" is asserted by what does not exist afterwards, never by a timing (shared machines are noisy).
    cache = tmp_path / "cache"
    proc = run_cli(["model=trellis_slat_tiny", "data=code_search", f"paths.cache_dir={cache}",
                    f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: model=trellis_slat_tiny (FlowMatching3DHead) cannot train on data=code_search (CodeSearchDataModule): "
        "the model takes TRELLIS slat latents with condition tokens, the data yields text pairs; data options it "
        "takes: data=trellis, data=trellis_demo, data=trellis_patterns"]
    assert not cache.exists()  # neither the tiny base nor the code-search corpus was built
    assert not (tmp_path / "run" / "config.yaml").exists()


# ---------------------------------------------------------------------------- item: real presets, real defaults
# The numbers of each real preset's sources (the recipes' comments cite them); a run bounded by epochs saves 10 times
# per run, one bounded by steps as often as its source.
REAL = {
    # model: (lr, weight decay, schedule, warmup steps, max_steps, max_epochs, accumulation, batch, r, alpha, init,
    #         dropout, adapter snapshot every (steps, epochs))
    "trellis_slat": (5e-6, 0.01, "constant", 0, 100000, -1, 2, 8, 64, 128, "kaiming", 0.0, (5000, 0)),
    "trellis_ss": (5e-6, 0.01, "constant", 0, 100000, -1, 2, 2, 64, 128, "kaiming", 0.0, (10000, 0)),
    "sd15": (1e-4, 0.01, "constant", 0, -1, 100, 1, 4, 4, 4, "gaussian", 0.0, (0, 10)),  # seed 002 (test_seed_sd)
    "lbm": (2e-4, 0.01, "constant", 0, -1, 50, 1, 4, 32, 64, "kaiming", 0.0, (0, 5)),
    **{m: (1e-4, 0.0, "linear", 0, -1, 3, 1, 64, 16, 32, "kaiming", 0.05, (0, 1))
       for m in ("clip", "qwen3_vl_embedding", "hf_encoder")},
}
# microsoft/TRELLIS configs/generation/slat_flow_img_dit_L_64l8p2_fp16.json, dataset.args.normalization
SLAT_MEAN = [-2.1687545776367188, -0.004347046371549368, -0.13352349400520325, -0.08418072760105133,
             -0.5271206498146057, 0.7238689064979553, -1.1414450407028198, 1.2039363384246826]
SLAT_STD = [2.377650737762451, 2.386378288269043, 2.124418020248413, 2.1748552322387695, 2.663944721221924,
            2.371192216873169, 2.6217446327209473, 2.684523105621338]


@pytest.mark.parametrize("model", sorted(REAL))
def test_real_presets_train_with_their_sources_numbers(model: str) -> None:
    cfg = compose_train([f"model={model}"])
    lr, wd, schedule, warmup, steps, epochs, accumulate, batch, r, alpha, init, dropout, every = REAL[model]
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (lr, wd)
    assert (cfg.scheduler.name, cfg.scheduler.warmup_steps) == (schedule, warmup)
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs, cfg.trainer.accumulate_grad_batches) == (
        steps, epochs, accumulate)
    assert cfg.data.batch_size == batch
    assert (cfg.adapter.r, cfg.adapter.alpha, cfg.adapter.init, cfg.adapter.dropout) == (r, alpha, init, dropout)
    snapshots, checkpoints = cfg.callbacks.adapter_checkpoint, cfg.callbacks.model_checkpoint
    assert (snapshots.every_n_steps, snapshots.every_n_epochs) == every
    assert (checkpoints.every_n_train_steps, checkpoints.every_n_epochs or 0) == every  # the same cadence
    assert snapshots.keep_last == checkpoints.save_top_k == cfg.callbacks.keep_last == 3
    assert (checkpoints.monitor, checkpoints.mode, checkpoints.save_last) == ("step", "max", True)


def test_the_default_job_keeps_its_numbers() -> None:
    cfg = compose_train([])
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.scheduler.name, cfg.scheduler.warmup_ratio) == (
        1e-3, 0.0, "linear", 0.1)
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs, cfg.trainer.precision) == (180, -1, "bf16-mixed")
    assert (cfg.data.batch_size, cfg.adapter.r, cfg.adapter.alpha, cfg.adapter.init) == (32, 8, 16, "kaiming")
    callbacks = cfg.callbacks
    assert (callbacks.adapter_checkpoint.every_n_steps, callbacks.model_checkpoint.every_n_train_steps) == (50, 50)
    assert callbacks.adapter_checkpoint.keep_last == callbacks.model_checkpoint.save_top_k == -1  # every snapshot
    # and so do the tiny presets (they bring their data, nothing else)
    for tiny in SMALL:
        other = compose_train([f"model={tiny}"])
        assert (other.optimizer.lr, other.trainer.max_steps, other.callbacks.keep_last) == (1e-3, 180, -1), tiny


def test_command_line_values_win_over_a_recipe_and_the_cadence_follows_the_run() -> None:
    cfg = compose_train(["model=trellis_slat", "optimizer.lr=1e-5", "adapter=r16", "trainer.max_steps=1000",
                         "callbacks.keep_last=5"])
    assert (cfg.optimizer.lr, cfg.adapter.r, cfg.adapter.alpha) == (1e-5, 16, 32)
    assert cfg.callbacks.adapter_checkpoint.every_n_steps == cfg.callbacks.model_checkpoint.every_n_train_steps == 50
    assert cfg.callbacks.adapter_checkpoint.keep_last == cfg.callbacks.model_checkpoint.save_top_k == 5
    # the SD recipe keeps alpha = rank for any rank, as diffusers' script does
    assert compose_train(["model=sd15", "adapter=r16"]).adapter.alpha == 16
    assert compose_train(["model=sd15", "trainer.max_epochs=30"]).callbacks.adapter_checkpoint.every_n_epochs == 3
    # debug overlays still win over a recipe
    assert compose_train(["model=trellis_slat", "debug=default"]).trainer.max_steps == 5


def test_a_cadence_without_a_run_length_is_one_line(tmp_path) -> None:
    cfg = compose_train(["model=trellis_slat", "trainer.max_steps=-1", *ENCODER["trellis_slat"], "model.ckpt=x",
                         "data.roots=x"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(UserError, match=r"^a save cadence of 20 per run needs the run's length, got -1"):
        run(cfg)


def test_slat_presets_normalise_with_trellis_released_values_and_condition_on_images() -> None:
    cfg = compose_train(["model=trellis_slat"])
    assert list(cfg.data.normalization.mean) == SLAT_MEAN and list(cfg.data.normalization.std) == SLAT_STD
    assert cfg.data.cond == "images" and compose_train(["model=trellis_ss"]).data.cond == "images"
    assert compose_train(["model=trellis_ss"]).data.normalization is None  # SS latents are used as they are
    for tiny in ("trellis_slat_tiny", "trellis_ss_tiny"):  # the demo presets keep their own setting
        data = compose_train([f"model={tiny}"]).data
        assert (data.get("normalization"), data.cond) == (None, "tokens")
    # images need the model's image encoder: without one the pair is refused before anything loads
    needle = (r"the model takes TRELLIS slat latents with condition tokens, the data yields TRELLIS slat latents with "
              r"condition images \(encoded by model.image_encoder\)")
    with pytest.raises(UserError, match=needle) as info:
        check_model_takes_data(compose_train(["model=trellis_slat", "model.image_encoder.pretrained=null"]))
    # data=trellis itself fits as shipped: the message says a setting of this run (here data.cond) is the difference
    assert str(info.value).endswith("data options it takes: data=trellis, data=trellis_demo, data=trellis_patterns "
                                    "(data=trellis as shipped; a data or model setting of this run changes what it "
                                    "yields)")


def test_the_minilm_preset_names_the_model_it_trains(tiny_bert) -> None:
    """``model=minilm`` names the Hub model its pip package copies only while it trains that copy: with
    ``model.pretrained`` pointing elsewhere the adapters' metadata and the card name the model actually trained."""
    from hydra.utils import instantiate

    assert compose_train(["model=minilm"]).model.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert compose_train(["model=minilm", "model.pretrained=BAAI/bge-small-en-v1.5"]).model.name is None
    other = compose_train(["model=minilm", f"model.pretrained={tiny_bert}"])
    assert other.model.name is None
    assert instantiate(other.model).base_model_identity()["name"] == tiny_bert.name  # the folder's, not MiniLM's
