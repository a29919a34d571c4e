"""The ``lightning-lora`` command: ``extract``, ``validate``, ``inspect``, ``merge``, ``combine``, ``push``, ``sample``,
and the families' own commands.

Model and adapter arguments are local paths or Hugging Face Hub ids (``lightning_lora.hub``).

The tools are generic over model families: they work on checkpoints (``.safetensors``, weights-only torch files,
diffusers folders, TRELLIS json+safetensors pairs) and on LoRA files in the layouts of ``adapters.formats``.
``sample <name>`` and the other family commands (e.g. ``encode-cond``) come from the heads
(``TaskHead.sample_command`` / ``TaskHead.commands``), imported only when the command line asks for one.
A bad input prints ``error: <one line>`` to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_lora import extras, options
from lightning_lora.checks import positive_int
from lightning_lora.errors import UserError, user_message
from lightning_lora.fileio import path_bytes

if TYPE_CHECKING:
    from lightning_lora.heads import HeadCommand

EXIT_USAGE = 2
#: the commands of this module; anything else on the command line is looked for among the heads' commands
GENERIC_COMMANDS = ("extract", "validate", "inspect", "merge", "combine", "push")
#: the layer list the LBM LoRA scripts' reconstruction test writes (seed 001), beside the validated LoRA here
SEED_LAYER_LIST = "lora_layer_names.txt"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage dump -> one clear line
        raise UserError(f"{self.prog}: {message}")


# ---------------------------------------------------------------------------- helpers
def _progress(desc: str):
    from tqdm.auto import tqdm

    def wrap(items: Iterable) -> Iterable:
        return tqdm(items, desc=desc, unit="module", file=sys.stderr, disable=None, leave=False)

    return wrap


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def _open_pair(base: str, tuned: str):
    from lightning_lora.adapters.checkpoints import align_prefix, check_same_keys, open_weights

    b, t = open_weights(base), open_weights(tuned)
    align_prefix(b, t)  # a Lightning training checkpoint (model.<key>) against released weights (<key>)
    check_same_keys(b, t)
    return b, t


def _write_formats(out: Path, modules, fmt: str | None, all_modules, base_name: str | None) -> list[Path]:
    from lightning_lora.adapters import formats

    if fmt is None:
        return []
    target = formats.extra_output_path(out, fmt)
    if fmt == "peft":
        formats.write_peft_dir(target, modules, base_model=base_name, all_modules=all_modules)
    elif fmt == "kohya":
        formats.write_kohya(target, modules)
    else:
        formats.write_diffusers(target, modules)
    return [target]


def _described(out: Path, family: str) -> dict[str, str]:
    """The ``modelspec.*`` keys of a file a tool writes (the architecture only when the family is known)."""
    from lightning_lora.adapters.metadata import modelspec

    return modelspec(architecture=f"{family}/lora" if family else None, title=out.stem)


# ---------------------------------------------------------------------------- extract
def cmd_extract(args: argparse.Namespace) -> int:
    from lightning_lora.adapters import formats
    from lightning_lora.adapters.checkpoints import module_weights
    from lightning_lora.adapters.extract import check_min_diff, extract_lora, parse_rank
    from lightning_lora.adapters.svd import check_clamp_quantile, check_max_error_ratio

    rank = parse_rank(args.rank, "--rank")
    conv_rank = parse_rank(args.conv_rank, "--conv-rank") if args.conv_rank is not None else rank
    device = options.device(args.device)
    if args.threads is not None:
        import torch

        torch.set_num_threads(positive_int(args.threads, "--threads"))
    check_min_diff(args.min_diff, "--min-diff")
    check_max_error_ratio(args.max_error_ratio)
    if args.clamp_quantile is not None:
        check_clamp_quantile(args.clamp_quantile)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the LoRA file is written as .safetensors")
    options.check_out(out, args.overwrite)
    if args.format:
        options.check_out(formats.extra_output_path(out, args.format), args.overwrite, "--format output")
    base, tuned = _open_pair(args.base, args.tuned)
    result = extract_lora(base, tuned, rank=rank, conv_rank=conv_rank, min_diff=args.min_diff,
                          modules=args.modules, method=args.method, device=device,
                          clamp_quantile=args.clamp_quantile, progress=_progress("extract"),
                          max_error_ratio=args.max_error_ratio)
    if not result.factors:
        raise UserError(f"no weight of {args.tuned} differs from the base by more than --min-diff={args.min_diff}")
    all_modules = list(module_weights(base))
    identity = {"base": base.path.name, "tuned": tuned.path.name, "base_kind": base.kind,
                "extracted_rank": "full" if rank is None else str(rank),
                "extracted_conv_rank": "full" if conv_rank is None else str(conv_rank), "method": args.method,
                "singular_values": "split symmetrically (sqrt(S) in each factor)"}
    formats.write_lora_file(out, result.factors, family=args.family, base_model=identity, all_modules=all_modules,
                            extra=_described(out, args.family))
    extra = _write_formats(out, result.factors, args.format, all_modules, base.path.name)
    errors = [r.rel_error for r in result.results]
    worst = max(result.results, key=lambda r: r.rel_error)
    params = sum(f.numel() for f in result.factors.values())
    print(f"extracted {len(result.factors)} modules ({len(result.skipped_small)} unchanged within "
          f"--min-diff={args.min_diff:g}) with method={args.method}"
          + (f" ({result.fallbacks} redone with the full SVD)" if result.fallbacks else ""))
    if args.verbose:
        for r in result.results:
            print(f"  {r.name}: rank {r.rank}, rel_error {r.rel_error:.4g}, energy {r.energy:.4g}, shape "
                  f"{list(r.shape)}")
    print(f"relative error: mean {sum(errors) / len(errors):.4g}, worst {worst.rel_error:.4g} ({worst.name})")
    print(f"parameters: {params:,}; wrote {out}" + "".join(f", {p}" for p in extra))
    return 0


# ---------------------------------------------------------------------------- validate
def cmd_validate(args: argparse.Namespace) -> int:
    from lightning_lora.adapters.checkpoints import module_weights
    from lightning_lora.adapters.extract import band_counts, quality_band, validate_lora
    from lightning_lora.adapters.formats import read_lora, resolve_modules
    from lightning_lora.fileio import atomic_write_text

    if not (math.isfinite(args.threshold) and args.threshold > 0):
        raise UserError(f"--threshold={args.threshold} must be a finite number > 0, e.g. 0.05")
    from lightning_lora import hub

    lora_path = Path(args.lora)
    if args.layers_out:
        layers_out = Path(args.layers_out)
    elif hub.is_hub_name(args.lora):  # beside a Hub adapter would be inside the Hub cache: here instead
        layers_out = Path(lora_path.stem + "_layers.txt")
    else:
        layers_out = lora_path.with_name(lora_path.stem + "_layers.txt")
    # the LBM LoRA scripts' list, regenerated on every validation as they do; written only with the default names
    seed_list = None if args.layers_out else layers_out.with_name(SEED_LAYER_LIST)
    report = Path(args.report) if args.report else None
    for p, flag in ((report, "--report"), (layers_out, "--layers-out")):
        if p is not None:
            options.check_out(p, args.overwrite, flag)
    base, tuned = _open_pair(args.base, args.tuned)
    lora = read_lora(lora_path)
    weights = module_weights(base)
    names = resolve_modules(lora.modules, weights, where=f"base {base.path.name}", prefixes=lora.submodules)
    results, uncovered = validate_lora(base, tuned, lora.modules, {n: weights[m] for n, m in names.items()},
                                       progress=_progress("validate"))
    ok = [r for r in results if r.rel_error < args.threshold]
    mean = sum(r.rel_error for r in results) / len(results)
    energy = sum(r.energy for r in results) / len(results)
    print(f"modules: {len(results)}; success rate {len(ok)}/{len(results)} = {100 * len(ok) / len(results):.1f}% "
          f"under relative error {args.threshold:g}")
    print(f"relative error: mean {mean:.4g}; energy retained: mean {energy:.4g}")
    print("modules per relative-error band:")
    for label, count in band_counts(r.rel_error for r in results).items():
        print(f"  {label}: {count}")
    if args.verbose:
        print("per module:")
        for r in results:
            print(f"  {r.name}: rel_error {r.rel_error:.4g} ({quality_band(r.rel_error).split(':')[0]}), energy "
                  f"{r.energy:.4g}, rank {r.rank}, shape {list(r.shape)}")
    print("worst modules:")
    for r in sorted(results, key=lambda r: -r.rel_error)[:5]:
        print(f"  {r.name}: rel_error {r.rel_error:.4g}, energy {r.energy:.4g}, rank {r.rank}, shape {list(r.shape)}")
    if uncovered:
        print(f"not in the LoRA: {len(uncovered)} layers with a non-zero delta, e.g. {', '.join(uncovered[:3])}")
    if report is not None:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["module", "shape", "rank", "rel_error", "energy_retained", "ok"])
        for r in results:
            writer.writerow([r.name, "x".join(map(str, r.shape)), r.rank, f"{r.rel_error:.6g}", f"{r.energy:.6g}",
                             int(r.rel_error < args.threshold)])
        for name in uncovered:
            writer.writerow([name, "", 0, "1", "0", 0])
        atomic_write_text(report, buf.getvalue())
        print(f"wrote {report}")
    names = "".join(f"{n}\n" for n in lora.modules)
    atomic_write_text(layers_out, names)
    print(f"wrote {layers_out}")
    if seed_list is not None and seed_list != layers_out:
        atomic_write_text(seed_list, names)
        print(f"wrote {seed_list} (the same list under the LBM LoRA scripts' name, replaced on every validate)")
    return 0


# ---------------------------------------------------------------------------- inspect
FORMAT_NAMES = {"lightning_lora": "lightning_lora single file", "peft": "PEFT directory",
                "snapshot": "a run's adapter snapshot (a PEFT directory per submodule)", "kohya": "kohya",
                "kohya_dotted": "kohya keys on dotted module names", "diffusers": "diffusers", "bare": "bare PEFT keys"}


def cmd_inspect(args: argparse.Namespace) -> int:
    from lightning_lora.adapters.formats import read_lora

    path = Path(args.lora)
    lora = read_lora(path)
    groups = Counter((f.rank, _fmt_num(f.alpha)) for f in lora.modules.values())
    leaves = Counter(m.rsplit(".", 1)[-1] for m in lora.modules)
    params = sum(f.numel() for f in lora.modules.values())
    print(f"file: {path} ({_human(path_bytes(lora.path or path))})")
    print(f"format: {FORMAT_NAMES[lora.format]}")
    print(f"family: {lora.family or 'unknown'}")
    print(f"modules: {len(lora.modules)}")
    print("rank/alpha:")
    for (r, a), n in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  r={r} alpha={a}: {n} module{'s' if n != 1 else ''}")
    shown = ", ".join(f"{leaf} x{n}" if n > 1 else leaf for leaf, n in leaves.most_common(12))
    more = len(leaves) - 12
    print(f"targets: {shown}" + (f", ... ({more} more)" if more > 0 else ""))
    print(f"parameters: {params:,}")
    base = {k: v for k, v in (lora.base_model or {}).items() if v}
    print("base model: " + (", ".join(f"{k}={v}" for k, v in sorted(base.items())) if base else "not recorded"))
    for note in lora.notes:
        print(f"note: {note}")
    return 0


def _fmt_num(x: float) -> str:
    return f"{x:g}"


# ---------------------------------------------------------------------------- merge
def cmd_merge(args: argparse.Namespace) -> int:
    from lightning_lora.adapters.checkpoints import module_weights, open_weights, write_weights_like
    from lightning_lora.adapters.combine import merge_into
    from lightning_lora.adapters.formats import read_lora, resolve_modules

    out = Path(args.out)
    options.check_out(out, args.overwrite)
    base = open_weights(args.base)
    if base.kind == "torch" and out.suffix == ".safetensors":
        raise UserError(f"--out {out}: the base is a torch file, so the merged weights are written as one too "
                        "(.pt/.ckpt)")
    weights = module_weights(base)
    parts: dict[str, list] = {}
    for spec in args.lora:
        path, scale = options.weighted(spec, "--lora")
        lora = read_lora(path)
        if lora.ignored:
            raise UserError(f"{path} holds {len(lora.ignored)} tensors that are not LoRA factors (e.g. "
                            f"{lora.ignored[0]}); merging only the factors would not reproduce the adapted model")
        names = resolve_modules(lora.modules, weights, where=f"base {base.path.name}", prefixes=lora.submodules)
        for name, module in names.items():
            f, key = lora.modules[name], weights[module]
            if f.weight_shape != base.shape(key):
                raise UserError(f"{path}: module {name!r} makes a delta of shape {list(f.weight_shape)} but the base "
                                f"weight {key!r} has shape {list(base.shape(key))} (an adapter for another model?)")
            parts.setdefault(key, []).append((f, scale))
    updates = {key: merge_into(base.get(key), ps, name=key) for key, ps in parts.items()}
    write_weights_like(base, out, updates)
    print(f"merged {len(args.lora)} LoRA(s) into {len(updates)} weights of {base.path.name}; wrote {out}")
    return 0


# ---------------------------------------------------------------------------- combine
def cmd_combine(args: argparse.Namespace) -> int:
    from lightning_lora.adapters.combine import check_combinable, combine_concat, combine_svd
    from lightning_lora.adapters.extract import parse_rank
    from lightning_lora.adapters.formats import read_lora, rename_like, write_lora_file

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the combined LoRA is written as .safetensors")
    options.check_out(out, args.overwrite)
    if args.method == "concat" and args.rank is not None:
        raise UserError("--rank applies to --method svd only; concat is exact and its rank is the sum of the ranks")
    inputs, sets = [], []
    for spec in args.adapters:
        path, weight = options.weighted(spec, "adapter")
        lora = read_lora(path)
        sets.append(lora)
        inputs.append((lora.modules, weight))
    dotted = sorted({m for s in sets if s.format != "kohya" for m in s.modules})
    inputs = [(rename_like(s, dotted).modules, w) for s, (_, w) in zip(sets, inputs, strict=True)]
    if not args.allow_disjoint:
        check_combinable([(str(s.path or spec), s.modules, s.family, s.base_model)
                          for s, spec in zip(sets, args.adapters, strict=True)])
    if args.method == "concat":
        modules = combine_concat(inputs, allow_disjoint=True)  # checked above, with the files' metadata
    else:
        modules = combine_svd(inputs, parse_rank(args.rank if args.rank is not None else "full", "--rank"),
                              device=options.device(args.device), allow_disjoint=True)
    if not modules:
        raise UserError("the combination is empty (every weight is 0)")
    identity = dict(sets[0].base_model or {})
    identity["combined_from"] = ", ".join(args.adapters)
    identity["combine_method"] = args.method
    families = {s.family for s in sets if s.family}
    family = families.pop() if len(families) == 1 else ""
    write_lora_file(out, modules, family=family, base_model=identity, extra=_described(out, family))
    ranks = Counter(f.rank for f in modules.values())
    print(f"combined {len(inputs)} LoRAs ({args.method}) into {len(modules)} modules, ranks "
          + ", ".join(f"r={r} x{n}" for r, n in ranks.most_common()) + f"; wrote {out}")
    return 0


# ---------------------------------------------------------------------------- push
def cmd_push(args: argparse.Namespace) -> int:
    from lightning_lora import publish

    publication = publish.prepare(args.run_dir, args.repo_id, args.snapshot)
    if args.dry_run:
        folder = publish.stage(publication, publish.dry_run_folder(args.repo_id, args.out, args.overwrite))
        print(f"dry run: {len(publication.files) + 1} files for {args.repo_id} (nothing uploaded):")
        print(folder)  # last: scripts read the folder from the last line
        return 0
    if args.out is not None:
        raise UserError("--out applies to --dry-run only (the folder is otherwise uploaded from a temporary copy)")
    url = publish.upload(publication, private=args.private, revision=args.revision,
                         commit_message=args.commit_message, token=args.token)
    print(f"pushed {len(publication.files) + 1} files of {publication.snapshot} to {args.repo_id}: {url}")
    return 0


# ---------------------------------------------------------------------------- parser
def sample_heads() -> list:
    """The heads that declare a ``sample`` command (``TaskHead.sample_command``), one per command name."""
    from lightning_lora.heads import registered_heads

    chosen: dict[str, type] = {}
    for head in registered_heads():
        if head.sample_command and "sample_command" in vars(head) and head.sample_command not in chosen:
            chosen[head.sample_command] = head
    return [chosen[name] for name in sorted(chosen)]


def head_commands() -> list[HeadCommand]:
    """The families' own top-level commands (``TaskHead.commands``), one per name, in name order."""
    from lightning_lora.heads import registered_heads

    chosen: dict[str, HeadCommand] = {}
    for head in registered_heads():
        if "commands" in vars(head):  # declared by this class, not inherited from a family base
            for command in head.commands():
                if command.name in (*GENERIC_COMMANDS, "sample"):
                    raise RuntimeError(f"{head.__name__} declares a command named {command.name!r}, which is taken")
                chosen.setdefault(command.name, command)
    return [chosen[name] for name in sorted(chosen)]


def _sample_runner(head: type) -> Callable[[argparse.Namespace], int]:
    """The head's ``run_sample``, after one line naming the extra when the family's packages are not installed."""
    def run(args: argparse.Namespace) -> int:
        if (module := extras.first_missing(extras.class_requires(head))) is not None:
            raise UserError(extras.missing_line(module, f"lightning-lora sample {head.sample_command}"))
        return head.run_sample(args)
    return run


def asks_for_a_head_command(argv: Sequence[str]) -> bool:
    """Whether the command line needs the heads: ``sample``, a family command, or no command / ``--help``
    (which lists them); a generic tool never imports them."""
    return next((a for a in argv if not a.startswith("-")), None) not in GENERIC_COMMANDS


def build_parser(heads: bool = True) -> argparse.ArgumentParser:
    """The command's parser; ``heads=False`` leaves out the heads' sample and family commands (finding them imports
    every family's head, which the generic tools do not need)."""
    from lightning_lora.adapters.formats import OUTPUT_FORMATS
    from lightning_lora.adapters.svd import METHODS

    p = _Parser(prog="lightning-lora", description="LoRA tools: extract, validate, inspect, merge, combine, push, "
                                                   "sample.",
                epilog="Every model or adapter argument takes a local path or a Hugging Face Hub id: org/name, "
                       "org/name@revision, or org/name/path/in/repo for one file (hf:// in front if a local folder "
                       "has the same name). HF_HUB_OFFLINE=1 reads the Hub cache only.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    e = sub.add_parser("extract", help="extract a LoRA from a base and a fine-tuned checkpoint by truncated SVD")
    e.add_argument("--base", "--base_model_path", dest="base", required=True,
                   help="base weights (.safetensors, .pt/.ckpt/.bin, folder, TRELLIS pair, or a Hub id)")
    e.add_argument("--tuned", "--tuned_model_path", dest="tuned", required=True,
                   help="fine-tuned weights with the same keys and shapes")
    e.add_argument("--out", "--save_to", dest="out", required=True,
                   help="output LoRA (.safetensors, self-describing)")
    e.add_argument("--rank", default="32", help="rank for linear and 1x1-conv weights, or 'full' (default 32; a "
                                                "rank above a layer's size keeps it whole, e.g. 9999)")
    e.add_argument("--conv-rank", "--conv_rank", dest="conv_rank", default=None,
                   help="rank for convs with a kernel > 1 (default: --rank)")
    e.add_argument("--min-diff", "--min_diff", dest="min_diff", type=float, default=1e-3,
                   help="skip weights whose delta max-abs is <= this (a finite number >= 0)")
    e.add_argument("--clamp-quantile", type=float, default=None,
                   help="clamp factors at this quantile of their absolute values (off by default; hurts accuracy)")
    e.add_argument("--modules", nargs="+", default=None,
                   help="only modules matching a glob ('*attn*') or containing a plain substring ('attn1')")
    e.add_argument("--device", default="cpu", help="cpu or cuda (for the SVDs)")
    e.add_argument("--method", choices=METHODS, default="randomized",
                   help="randomized (default: a sketch kept only where its error is certified within "
                        "--max-error-ratio of the optimum, else that module's full SVD), or full SVD everywhere")
    e.add_argument("--max-error-ratio", type=float, default=1.01,
                   help="randomized: each module's error at most this times its Eckart-Young optimum (>= 1; "
                        "default 1.01)")
    e.add_argument("--format", choices=OUTPUT_FORMATS, default=None,
                   help="also write a PEFT directory (<out>_peft/), or a kohya/diffusers file (<out>.<format>."
                        "safetensors)")
    e.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the SVDs (1 is often fastest on a busy machine)")
    e.add_argument("--family", default="", help="family recorded in the file's metadata (e.g. sd, trellis)")
    e.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    e.add_argument("--verbose", action="store_true", help="print one line per extracted module")
    e.set_defaults(func=cmd_extract)

    v = sub.add_parser("validate", help="per-module reconstruction error of a LoRA against base and tuned weights")
    v.add_argument("--base", "--base_model_path", dest="base", required=True)
    v.add_argument("--tuned", "--tuned_model_path", dest="tuned", required=True)
    v.add_argument("--lora", "--lora_path", dest="lora", required=True, help="LoRA file or PEFT directory")
    v.add_argument("--report", default=None, help="write a per-module CSV here")
    v.add_argument("--threshold", type=float, default=0.05, help="relative error counted as a success (0.05)")
    v.add_argument("--layers-out", default=None, help="LoRA layer names, one a line (default <lora>_layers.txt, "
                                                      f"and {SEED_LAYER_LIST} beside it, replaced each time)")
    v.add_argument("--overwrite", action="store_true", help="replace existing report files")
    v.add_argument("--verbose", action="store_true", help="print one line per module")
    v.set_defaults(func=cmd_validate)

    i = sub.add_parser("inspect", help="describe a LoRA file or PEFT directory")
    i.add_argument("lora", help="LoRA file, PEFT directory or a run's adapters/final")
    i.set_defaults(func=cmd_inspect)

    m = sub.add_parser("merge", help="fold LoRAs into base weights (W += scale·alpha/r·B·A), in the base's format")
    m.add_argument("--base", required=True)
    m.add_argument("--lora", required=True, action="append",
                   help="LoRA[:scale] (a file, PEFT directory or a run's adapters/final); repeat for several")
    m.add_argument("--out", required=True)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=cmd_merge)

    c = sub.add_parser("combine", help="one LoRA equal to a weighted sum of LoRAs")
    c.add_argument("adapters", nargs="+", help="LoRA[:weight] ...")
    c.add_argument("--out", required=True)
    c.add_argument("--method", choices=("concat", "svd"), default="concat",
                   help="concat: exact, ranks add; svd: the exact sum re-factorised at --rank")
    c.add_argument("--rank", default=None, help="rank for --method svd (default: exact, the sum of the ranks)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--allow-disjoint", action="store_true",
                   help="combine adapters even when one shares no module with the others or their metadata name "
                        "different families or base models (refused by default: they are for different models)")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_combine)

    pu = sub.add_parser("push", help="upload a run's adapter snapshot and a generated model card to the Hugging Face "
                                     "Hub")
    pu.add_argument("run_dir", help="the run directory (python -m lightning_lora.train's output)")
    pu.add_argument("repo_id", help="the Hub repository, namespace/name (created if missing)")
    pu.add_argument("--snapshot", default="final", help="which adapters/<snapshot> to upload (default final, or "
                                                         "step_NNNNNNN)")
    pu.add_argument("--private", action="store_true", help="create the repository as private")
    pu.add_argument("--revision", default=None, help="upload to this branch (created from main if missing)")
    pu.add_argument("--commit-message", default=None)
    pu.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    pu.add_argument("--dry-run", action="store_true",
                    help="write the folder that would be uploaded and print its path last; upload nothing")
    pu.add_argument("--out", default=None, help="with --dry-run: the folder to write (default: a new temporary one)")
    pu.add_argument("--overwrite", action="store_true", help="with --dry-run --out: replace a non-empty folder")
    pu.set_defaults(func=cmd_push)

    sp = sub.add_parser("sample", help="sample with a base model and an optional LoRA (per family)")
    fam = sp.add_subparsers(dest="family", required=True, parser_class=_Parser)
    for head in sample_heads() if heads else []:
        cmd = fam.add_parser(head.sample_command, help=head.sample_help)
        head.add_sample_arguments(cmd)
        cmd.set_defaults(func=_sample_runner(head))
    for command in head_commands() if heads else []:
        cmd = sub.add_parser(command.name, help=command.help)
        command.add_arguments(cmd)
        cmd.set_defaults(func=command.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere on the line: the traceback of an error instead of one line
    argv = [a for a in argv if a != "--debug"]
    try:
        parser = build_parser(heads=asks_for_a_head_command(argv))
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except Exception as exc:
        message = user_message(exc)  # None: a bug, whose traceback is the message
        if message is None or debug:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
