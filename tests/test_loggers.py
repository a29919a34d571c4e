"""The loggers (conf/logger/): csv, mlflow and wandb (offline) beside TensorBoard, several at once, every one under
the run directory, each given the loss and the preview pictures (callbacks/trackers.py); run names from the run
directory, groups from the sweep; a logger whose package is missing is one line naming the extra."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_error_line, train_main
from PIL import Image

# A 3-step tiny Stable Diffusion run with its preview (1 prompt, 1 seed, 2 sampling steps) before and after.
TINY_SD_RUN = ["model=sd_tiny", "data=digits", "data.num_images=16", "data.batch_size=4", "trainer.max_steps=3",
               "trainer.log_every_n_steps=1", "trainer.precision=32-true", "validate_before=false",
               "validate_after=false", "callbacks.adapter_checkpoint.every_n_steps=0",
               "callbacks.model_checkpoint.every_n_train_steps=3", "~callbacks.progress_bar",
               "model.previews.prompts=[a handwritten digit 3]", "model.previews.seeds=[0]",
               "model.previews.num_inference_steps=2", "model.previews.final=true"]


@pytest.fixture(scope="module")
def wandb_home(tmp_path_factory):
    """wandb offline, its settings and caches in a temporary folder (never the user's home)."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(name, str(home / name.lower()))
        yield home


@pytest.fixture(scope="module")
def three_loggers_run(tmp_path_factory, cache_dir, wandb_home) -> Path:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    run_dir = tmp_path_factory.mktemp("loggers") / "run"
    rc = train_main([*TINY_SD_RUN, "logger=[csv,mlflow,wandb]", f"paths.cache_dir={cache_dir}",
                     f"hydra.run.dir={run_dir}"])
    assert rc == 0
    return run_dir


@pytest.mark.slow  # a 3-step tiny SD run with previews and three loggers: about 20 s
def test_csv_logger_writes_the_loss(three_loggers_run):
    with open(three_loggers_run / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 3 and all(v > 0 for v in losses)


@pytest.mark.slow  # a 3-step tiny SD run with previews and three loggers: about 20 s
def test_mlflow_file_store_holds_the_loss_and_the_previews(three_loggers_run):
    runs = [p.parent for p in (three_loggers_run / "mlruns").glob("*/*/meta.yaml")]
    assert len(runs) == 1
    run = runs[0]
    steps = [line.split()[2] for line in (run / "metrics" / "train" / "loss").read_text().splitlines()]
    assert steps == ["0", "1", "2"]
    images = sorted(p.name for p in (run / "artifacts" / "images").glob("*.png"))
    assert [n.split("+")[:3] for n in images] == [["samples~base", "step", "0"], ["samples~lora", "step", "3"]]
    # the run name: the run directory (relative to the working directory when under it; here it is not)
    assert (run / "tags" / "mlflow.runName").read_text() == three_loggers_run.resolve().as_posix()
    assert (run.parent / "meta.yaml").read_text().count("name: lightning_lora") == 1


@pytest.mark.slow  # a 3-step tiny SD run with previews and three loggers: about 20 s
def test_wandb_offline_run_holds_the_loss_and_the_previews(three_loggers_run):
    (offline,) = (three_loggers_run / "wandb").glob("offline-run-*")
    (history,) = offline.glob("run-*.wandb")
    assert b"train/loss" in history.read_bytes()
    pictures = sorted(p.name.rsplit("_", 2)[0] for p in (offline / "files" / "media" / "images" / "samples").iterdir())
    assert pictures == ["base", "lora"]


@pytest.mark.slow  # a 3-step tiny SD run with previews and three loggers: about 20 s
def test_the_loggers_sit_beside_the_run_files(three_loggers_run):
    assert {"csv", "mlruns", "wandb", "samples", "adapters"} <= {p.name for p in three_loggers_run.iterdir()}
    assert not (three_loggers_run / "tensorboard").exists()  # only the loggers asked for


# ---------------------------------------------------------------------------- the dispatch
def test_log_image_reaches_each_logger_that_takes_images(tmp_path, wandb_home, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_lora.callbacks.trackers import end_runs, log_image

    wandb_module = pytest.importorskip("wandb")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tensorboard = TensorBoardLogger(tmp_path, name="tb", version="")
    mlflow = MLFlowLogger(experiment_name="t", run_name="r", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    wandb = WandbLogger(save_dir=tmp_path, project="t", offline=True)
    plain = CSVLogger(tmp_path, name="csv", version="")
    picture = torch.zeros(3, 4, 6)
    picture[0] = 1.0  # red
    try:
        assert log_image([plain, tensorboard, mlflow, wandb], "samples/lora", picture, 7) == [tensorboard, mlflow,
                                                                                               wandb]
        assert wandb_module.run is not None
    finally:
        end_runs([plain, wandb])
    assert wandb_module.run is None  # a sweep's next job in this process starts its own run
    tensorboard.experiment.flush()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    (event,) = acc.Images("samples/lora")
    assert (event.step, event.width, event.height) == (7, 6, 4)
    (png,) = (tmp_path / "mlruns").glob("*/*/artifacts/images/samples~lora+step+7+*[0-9a-f].png")
    (media,) = (tmp_path / "wandb").glob("offline-run-*/files/media/images/samples/lora_*.png")
    for path in (png, media):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert pixels.shape == (4, 6, 3) and (pixels == [255, 0, 0]).all()


# ---------------------------------------------------------------------------- names and groups
def test_run_name_is_the_run_directory_and_a_sweep_is_the_group(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from lightning_lora.config import compose_config
    from lightning_lora.rundir import run_name, sweep_name

    monkeypatch.chdir(tmp_path)
    assert run_name(str(tmp_path / "outputs" / "2026-01-31" / "12-00-00")) == "outputs/2026-01-31/12-00-00"
    assert run_name("/elsewhere/run") == "/elsewhere/run"
    assert sweep_name("lightning_lora") == "lightning_lora"  # a single run: the default

    cfg = compose_config(["logger=many"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = "${fresh_dir:never-read}"  # would claim a directory if it were read
        cfg.hydra.job.num = 3
        cfg.hydra.runtime.output_dir = str(tmp_path / "outputs" / "multirun" / "2026-01-31" / "12-00-00" / "3")
        cfg.paths.output_dir = cfg.hydra.runtime.output_dir
    hydra_config = HydraConfig.instance()
    saved = hydra_config.cfg
    hydra_config.set_config(cfg)
    try:
        assert cfg.logger.wandb.group == "outputs/multirun/2026-01-31/12-00-00"
        assert cfg.logger.wandb.name == "outputs/multirun/2026-01-31/12-00-00/3"
        assert cfg.logger.mlflow.experiment_name == "outputs/multirun/2026-01-31/12-00-00"
        assert cfg.logger.mlflow.tracking_uri == f"file:{tmp_path}/outputs/multirun/2026-01-31/12-00-00/3/mlruns"
    finally:
        hydra_config.cfg = saved
    assert not (tmp_path / "never-read").exists()


@pytest.mark.parametrize("choice", ["many", "[csv,mlflow]", "[tensorboard,csv,wandb]"])
def test_several_loggers_compose_from_one_group(choice):
    from omegaconf import OmegaConf

    from lightning_lora.config import compose_config

    cfg = compose_config([f"logger={choice}"], return_hydra_config=True)
    expected = ["tensorboard", "csv", "mlflow", "wandb"] if choice == "many" else choice.strip("[]").split(",")
    assert list(cfg.logger) == expected
    for node in OmegaConf.to_container(cfg.logger).values():  # unresolved: where each one writes
        assert node.get("save_dir", node.get("tracking_uri")) in ("${paths.output_dir}",
                                                                  "file:${paths.output_dir}/mlruns")


# ---------------------------------------------------------------------------- a missing package
@pytest.mark.parametrize(("logger", "package"), [("wandb", "wandb"), ("mlflow", "mlflow"), ("many", "mlflow")])
def test_a_logger_without_its_package_is_one_line_naming_the_extra(logger, package, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)
    # a model that is not there: the line must come before anything tries to load it
    rc = train_main([f"logger={logger}", f"model.pretrained={tmp_path / 'no-model'}",
                     f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert_one_error_line(rc, err, f"logger.{package} needs {package}: pip install 'lightning_lora[{package}]'")
    assert not (tmp_path / "run" / "config.yaml").exists()
