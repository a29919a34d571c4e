"""Embedding family: text encoders, CLIP and Qwen3-VL-Embedding trained contrastively (InfoNCE with hard negatives).

Batches are ``{"query": [item], "positive": [item], "negatives": [[item]]?}`` where an item is a text or
``{"text", "image"}``; the embedder prepares them itself, so any datamodule that yields such pairs works.
Validation retrieves every validation query against the whole validation corpus and reports recall@k,
MRR@10 and NDCG@10 (torchmetrics), also at each Matryoshka dim.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG, RetrievalRecall

from lightning_lora.adapters import save_whole_model_dir
from lightning_lora.checks import optional_positive_int
from lightning_lora.errors import UserError
from lightning_lora.fileio import atomic_directory
from lightning_lora.heads.base import StepOutput, TaskHead
from lightning_lora.models.embedders import (  # noqa: F401 (pool: re-export)
    Embedder,
    TextEmbedder,
    item_key,
    pool,
    quiet_transformers,
)

#: a snapshot's whole-model export: a PEFT directory of the whole AutoModel (LoRA), or the model folder (full)
WHOLE_MODEL_DIR = "model"

if TYPE_CHECKING:
    from lightning_lora.publish import CardContext


def info_nce(q: torch.Tensor, candidates: torch.Tensor, temperature: float | torch.Tensor,
             same_as_positive: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each query against every candidate; query i's positive is candidate ``labels[i]``
    (default i). Every other candidate (other queries' positives, every hard negative) is in the denominator.

    ``same_as_positive[i, j]`` marks candidates that duplicate query i's positive (same text): they are
    masked out, because scoring them as negatives would punish the right answer.
    """
    logits = q @ candidates.T / temperature
    if same_as_positive is not None:
        logits = logits.masked_fill(same_as_positive, float("-inf"))
    if labels is None:
        labels = torch.arange(q.size(0), device=q.device)
    return F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, labels)


def matryoshka_info_nce(q: torch.Tensor, candidates: torch.Tensor, temperature: float | torch.Tensor,
                        dims: Sequence[int], weights: Sequence[float], same_as_positive: torch.Tensor | None = None,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_d w_d · InfoNCE on the first d dimensions, each slice re-normalised (Matryoshka representation
    learning). ``q``/``candidates`` are raw (unnormalised) embeddings."""
    total = q.new_zeros(())
    for d, w in zip(dims, weights, strict=True):
        qd, cd = F.normalize(q[:, :d], dim=-1), F.normalize(candidates[:, :d], dim=-1)
        total = total + w * info_nce(qd, cd, temperature, same_as_positive, labels)
    return total


# --------------------------------------------------------------------------- multi-process
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's rows of ``x`` in rank order, differentiably (the backward sums each process's
    gradient into the rows it owns), and this process's offset. Uneven row counts are padded for the
    collective and cut back out."""
    rank, world = _world()
    if world == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[0])) if x.shape[0] < max(sizes) else x
    parts = all_gather(padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)]), sum(sizes[:rank])


def gather_texts(items: Sequence[Any]) -> list[Any]:
    """Every process's items (their ``item_key``s), in rank order, for duplicate masks."""
    _, world = _world()
    keys = [item_key(item) for item in items]
    if world == 1:
        return keys
    out: list[list[Any]] = [[] for _ in range(world)]
    dist.all_gather_object(out, keys)
    return [t for part in out for t in part]


def duplicate_mask(positives: Sequence[Any], candidates: Sequence[Any], device: torch.device, offset: int = 0
                   ) -> torch.Tensor | None:
    """[B, C] True where candidate j is the same item as positive i (but is not i's own slot, offset + i).
    Items are texts or image/text mappings, compared through ``item_key``."""
    index: dict[Any, list[int]] = {}
    for j, item in enumerate(candidates):
        index.setdefault(item_key(item), []).append(j)
    pairs = [(i, j) for i, item in enumerate(positives) for j in index.get(item_key(item), []) if j != offset + i]
    if not pairs:
        return None
    mask = torch.zeros(len(positives), len(candidates), dtype=torch.bool, device=device)
    rows, cols = zip(*pairs, strict=True)
    mask[list(rows), list(cols)] = True
    return mask


def retrieval_metrics(queries: torch.Tensor, docs: torch.Tensor, ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    """Query i's only relevant document is doc i; rank the whole corpus for every query."""
    n = queries.size(0)
    scores = (queries.detach().float() @ docs.detach().float().T).flatten()
    # torchmetrics counts a document with a score <= 0 as not retrieved at all (1.9: `where(preds > 0, ...)`),
    # and cosine similarities are often negative; a shift keeps every ranking and makes every score positive.
    scores = scores - scores.min() + 1.0
    target = torch.eye(n, dtype=torch.bool, device=scores.device).flatten()
    indexes = torch.arange(n, device=scores.device).repeat_interleave(n)
    metrics = {f"recall@{k}": RetrievalRecall(top_k=k) for k in ks}
    metrics |= {"mrr@10": RetrievalMRR(top_k=10), "ndcg@10": RetrievalNormalizedDCG(top_k=10)}
    return {name: float(m(scores, target, indexes=indexes)) for name, m in metrics.items()}


# --------------------------------------------------------------------------- gradient-cache plumbing
class _GradCacheLoss(torch.autograd.Function):
    """Carries a loss computed without a graph; its backward returns the replayed parameter gradients."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, replay: Callable[[torch.Tensor], list[torch.Tensor]],
                *params: torch.Tensor) -> torch.Tensor:
        ctx.replay = replay
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return (None, None, *ctx.replay(grad_output))


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _autocast_state(device: torch.device) -> tuple[str, torch.dtype] | None:
    kind = device.type if device.type in ("cuda", "cpu") else "cpu"
    return (kind, torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else None


def _autocast(state: tuple[str, torch.dtype] | None):
    """The forward pass's autocast again (a backward runs outside Lightning's autocast context)."""
    return torch.autocast(state[0], dtype=state[1]) if state else contextlib.nullcontext()


def _matryoshka(dims: Any, weights: Any) -> tuple[list[int] | None, list[float] | None]:
    if dims is None:
        if weights is not None:
            raise UserError("model.mrl_weights is set but model.mrl_dims is not; give the dims, e.g. [384,256,128]")
        return None, None
    dims = [int(d) for d in dims]
    if not dims or any(d <= 0 for d in dims):
        raise UserError(f"model.mrl_dims={dims} must be positive dimensions, e.g. [384,256,128,64]")
    weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
    if len(weights) != len(dims):
        raise UserError(f"model.mrl_weights={weights} needs one weight per dim in model.mrl_dims={dims}")
    return dims, weights


def _chunk_size(cfg: Any) -> int | None:
    size = (cfg or {}).get("chunk_size") if hasattr(cfg or {}, "get") else cfg
    return optional_positive_int(size, "model.gradient_cache.chunk_size", hint=" (e.g. 8) or null")


class EmbeddingHead(TaskHead):
    """Contrastive LoRA training of an embedding model (an ``Embedder`` from ``models/embedders.py``).

    Text encoders (BERT, MiniLM, any local Hugging Face encoder folder) are built from ``pretrained`` and the
    text options; CLIP and Qwen3-VL-Embedding come as ``embedder`` (their presets build it). LoRA goes into the
    embedder's language/text submodules, and into its vision tower too with ``vision=True``.
    """

    family: ClassVar[str] = "embedding"
    monitor: ClassVar[str] = "val/recall@1"
    monitor_mode: ClassVar[str] = "max"
    # BERT/MiniLM, CLIP (text and vision towers), Qwen3-VL (language decoder and vision blocks)
    fsdp_blocks: ClassVar[tuple[str, ...]] = ("BertLayer", "CLIPEncoderLayer", "Qwen3VLTextDecoderLayer",
                                              "Qwen3VLVisionBlock")

    def __init__(
        self,
        pretrained: str | None = None,
        targets: list[str] | tuple[str, ...] = ("query", "key", "value", "dense"),
        pooling: str = "mean",
        temperature: float = 0.05,
        symmetric: bool = False,
        query_max_length: int = 64,
        doc_max_length: int = 128,
        query_prefix: str = "",
        doc_prefix: str = "",
        name: str | None = None,
        config_overrides: dict[str, Any] | None = None,
        learnable_temperature: bool = False,
        mrl_dims: list[int] | None = None,
        mrl_weights: list[float] | None = None,
        gather_across_processes: bool = True,
        gradient_cache: dict[str, Any] | None = None,
        embedder: Embedder | None = None,
        vision: bool = False,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise UserError(f"model.temperature={temperature} must be > 0 (e.g. 0.05)")
        self.mrl_dims, self.mrl_weights = _matryoshka(mrl_dims, mrl_weights)
        self.chunk_size = _chunk_size(gradient_cache)
        self.gather_across_processes = gather_across_processes
        if embedder is None:
            if not pretrained:
                raise UserError("model.pretrained is required: pass model.pretrained=<local Hugging Face model folder>")
            try:
                embedder = TextEmbedder(pretrained, pooling, query_prefix, doc_prefix, query_max_length,
                                        doc_max_length, {"encoder": list(targets)}, config_overrides, name, dtype)
            except UserError as e:
                raise UserError(f"model.{e}" if str(e).startswith(("pooling=", "query_max", "doc_max"))
                                else str(e)) from None
        self.embedder = embedder
        if vision and not embedder.vision_names:
            raise UserError(f"model.vision=true but the {embedder.family} embedder has no vision tower")
        self.vision = vision
        # A learnable temperature is trained as log(T) (always positive) beside the adapter; CLIP may instead
        # train its own logit_scale (embedder.learnable_logit_scale).
        self.log_temperature = nn.Parameter(torch.tensor(float(temperature)).log(), requires_grad=False)
        self.learnable_temperature = learnable_temperature
        self.symmetric = symmetric

    # ------------------------------------------------------------------ TaskHead
    def adaptable_submodules(self) -> dict[str, nn.Module]:
        return self.embedder.adaptable_submodules()

    def default_targets(self) -> dict[str, list[str]]:
        return self.embedder.default_targets()

    def default_submodules(self) -> list[str]:
        return self.embedder.default_submodules(self.vision)

    def base_model_identity(self) -> dict[str, str]:
        return self.embedder.identity()

    def enable_gradient_checkpointing(self) -> None:
        self.embedder.enable_gradient_checkpointing()

    def export_adapters(self, snapshot: Path, adapters: dict[str, PeftModel], step: int,
                        run_dir: Path | None = None) -> list[Path]:
        """Beside the per-submodule PEFT directories, ``model/``: every adapter as ONE PEFT directory of the whole
        transformers model, so ``PeftModel.from_pretrained(AutoModel.from_pretrained(base), "<snapshot>/model")``
        loads it (vembed-factory's and HF Trainer's ``checkpoint-N/``)."""
        if not adapters:
            return []
        prefixes = self.embedder.submodule_prefixes()
        return [save_whole_model_dir(adapters, {sub: prefixes[sub] for sub in adapters}, snapshot / WHOLE_MODEL_DIR,
                                     base_model=self.embedder.source)]

    @classmethod
    def card_usage(cls, card: CardContext) -> list[tuple[str, str]]:
        """Our ``Predictor`` with the run's encoding settings (pooling, prefixes, lengths: the Hub copy has no
        config.yaml to read them from), and PEFT on the whole transformers model (``model/``)."""
        from lightning_lora.predict import run_settings

        _, family, settings = run_settings(card.snapshot)
        arguments = "".join(f", {key}={value!r}" for key, value in sorted(settings.items()) if value is not None)
        usage = [("lightning_lora Predictor", "\n".join([
            "from lightning_lora.predict import Predictor",
            "",
            f'predictor = Predictor.from_pretrained("{card.base}", "{card.repo_id}", family="{family}"{arguments})',
            'queries = predictor.encode_text(["read a file line by line"], role="query")',
            'documents = predictor.encode_text(["def read_lines(path): ..."], role="document")',
            "scores = queries @ documents.T"]))]
        if f"{WHOLE_MODEL_DIR}/adapter_config.json" in card.files:
            usage.append(("PEFT", "\n".join([
                "from peft import PeftModel",
                "from transformers import AutoModel, AutoTokenizer",
                "",
                f'tokenizer = AutoTokenizer.from_pretrained("{card.base}")',
                f'model = PeftModel.from_pretrained(AutoModel.from_pretrained("{card.base}"), "{card.repo_id}", '
                f'subfolder="{WHOLE_MODEL_DIR}")',
                f"# embeddings: pool the last hidden state as the run did ({settings.get('pooling', 'see the run')}),"
                " then L2-normalise"])))
        return usage

    def export_full_weights(self, snapshot: Path, submodules: list[str]) -> list[Path]:
        """A full fine-tuning snapshot: ``model/``, the whole trained model as a transformers folder (tokenizer and
        processor files too) that ``AutoModel.from_pretrained`` and ``Predictor(run_dir)`` load."""
        with atomic_directory(snapshot / WHOLE_MODEL_DIR) as tmp, quiet_transformers():
            self.embedder.save_pretrained(tmp)
        return [snapshot / WHOLE_MODEL_DIR]

    @classmethod
    def batch_kinds(cls, preset: Mapping[str, Any]) -> tuple[str, ...]:
        """Text pairs; image-text pairs too when the preset's embedder class has a vision tower (CLIP, Qwen3-VL)."""
        from hydra.utils import get_class

        from lightning_lora.data.image_pairs import IMAGE_TEXT_PAIRS
        from lightning_lora.data.pairs import TEXT_PAIRS

        target = (preset.get("embedder") or {}).get("_target_")
        sees_images = bool(target) and bool(get_class(str(target)).vision_names)
        return (TEXT_PAIRS, IMAGE_TEXT_PAIRS) if sees_images else (TEXT_PAIRS,)

    @classmethod
    def build_tiny(cls, path: Path, preset: Mapping[str, Any]) -> str:
        """The tiny folder of the preset's embedder class (``embedder._target_``: CLIP, Qwen3-VL)."""
        from lightning_lora.models.tiny_embedders import TINY_BUILDERS

        target = str((preset.get("embedder") or {}).get("_target_") or "")
        build = TINY_BUILDERS.get(target.rsplit(".", 1)[-1])
        return super().build_tiny(path, preset) if build is None else build(path)

    # ------------------------------------------------------------------ encoding
    @property
    def device(self) -> torch.device:
        return self.embedder.device

    def embed(self, items: Sequence[Any], role: str) -> torch.Tensor:
        """Raw (unnormalised) embeddings [len(items), dim] for ``role`` "query" or "document"; an item is a
        text or ``{"text", "image"}``. float32 (float64 when the model is float64)."""
        return self.embedder.embed(items, role)

    def encode(self, items: Sequence[Any], role: str = "query") -> torch.Tensor:
        """L2-normalised embeddings [len(items), dim]."""
        return F.normalize(self.embed(items, role), dim=-1)

    def encode_queries(self, items: Sequence[Any]) -> torch.Tensor:
        return self.encode(items, "query")

    def encode_documents(self, items: Sequence[Any]) -> torch.Tensor:
        return self.encode(items, "document")

    # ------------------------------------------------------------------ objective
    @property
    def temperature(self) -> torch.Tensor:
        scale = self.embedder.logit_scale
        if scale is not None:  # CLIP's learnable inverse temperature, capped at 100 as CLIP does
            return 1.0 / scale.clamp(max=math.log(100.0)).exp()
        return self.log_temperature.exp()

    def extra_trainable_parameters(self) -> dict[str, nn.Parameter]:
        extra = {"log_temperature": self.log_temperature} if self.learnable_temperature else {}
        if self.embedder.logit_scale is not None:
            extra["logit_scale"] = self.embedder.logit_scale
        return extra

    def loss_from_embeddings(self, q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None,
                             batch: dict[str, Any]) -> torch.Tensor:
        """InfoNCE of this process's queries against every positive and every hard negative of the global
        batch (all processes, gathered with gradient), at every Matryoshka dim; plus the symmetric term."""
        gather = self.gather_across_processes
        positives, queries = list(batch["positive"]), list(batch["query"])
        all_p, offset = gather_rows(p) if gather else (p, 0)
        all_n = (gather_rows(n)[0] if gather else n) if n is not None else None
        # positives first, then negatives: labels stay offset + i (no PNNPNN interleaving)
        candidates = torch.cat([all_p, all_n]) if all_n is not None else all_p
        negatives = [t for row in batch.get("negatives", []) for t in row]
        texts = gather_texts(positives) + gather_texts(negatives) if gather else positives + negatives
        labels = offset + torch.arange(q.size(0), device=q.device)
        dims, weights = self.mrl_dims or [q.size(1)], self.mrl_weights or [1.0]
        if max(dims) > q.size(1):
            raise UserError(f"model.mrl_dims={dims} has a dim above the embedding size {q.size(1)}")
        mask = duplicate_mask(positives, texts, q.device, offset)
        loss = matryoshka_info_nce(q, candidates, self.temperature, dims, weights, mask, labels)
        if self.symmetric:  # positives retrieving their queries (negatives have no query to find)
            all_q = gather_rows(q)[0] if gather else q
            query_texts = gather_texts(queries) if gather else queries
            mask = duplicate_mask(queries, query_texts, q.device, offset)
            loss = (loss + matryoshka_info_nce(p, all_q, self.temperature, dims, weights, mask, labels)) / 2
        return loss

    def contrastive_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        negatives = [t for row in batch.get("negatives", []) for t in row]
        q = self.embed(batch["query"], "query")
        p = self.embed(batch["positive"], "document")
        n = self.embed(negatives, "document") if negatives else None
        return self.loss_from_embeddings(q, p, n, batch)

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        loss = self.cached_loss(batch) if self.chunk_size else self.contrastive_loss(batch)
        learnable = self.learnable_temperature or self.embedder.logit_scale is not None
        logs = {"temperature": self.temperature.detach()} if learnable else {}
        return StepOutput(loss, batch_size=len(batch["query"]), logs=logs)

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        q = self.embed(batch["query"], "query")
        d = self.embed(batch["positive"], "document")
        mask = duplicate_mask(batch["positive"], batch["positive"], q.device)
        loss = info_nce(F.normalize(q, dim=-1), F.normalize(d, dim=-1), self.temperature, mask)
        out = {"loss": loss, "query_emb": q, "doc_emb": d}
        if "index" in batch:
            out["index"] = batch["index"].to(q.device)
        return out

    def validation_metrics(self, collected: dict[str, torch.Tensor]) -> dict[str, float]:
        q, d = collected["query_emb"], collected["doc_emb"]
        metrics = retrieval_metrics(F.normalize(q, dim=-1), F.normalize(d, dim=-1))
        for dim in sorted(set(self.mrl_dims or []) - {q.size(1)}, reverse=True):  # each smaller Matryoshka dim
            truncated = retrieval_metrics(F.normalize(q[:, :dim], dim=-1), F.normalize(d[:, :dim], dim=-1))
            metrics |= {f"dim{dim}/{k}": v for k, v in truncated.items()}
        return metrics

    # ------------------------------------------------------------------ gradient cache
    def on_strategy(self, strategy: str) -> None:
        if self.chunk_size and "fsdp" in strategy.lower():
            warnings.warn("model.gradient_cache is turned off under FSDP (its replayed forward passes would need "
                          "their own all-gathers of the sharded weights); training with plain steps", stacklevel=2)
            self.chunk_size = None

    def cached_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The same loss and gradients as ``contrastive_loss`` with activation memory bounded by one chunk.

        GradCache: embed every chunk without a graph (remembering the RNG state), take the loss and its
        gradient with respect to the embeddings, and return a loss whose backward replays each chunk with
        the same RNG state and pulls that gradient through the encoder. The replay hands the summed
        parameter gradients to autograd in one piece, so DDP's gradient hooks fire once per step.
        """
        negatives = [t for row in batch.get("negatives", []) for t in row]
        groups = [(list(batch["query"]), "query"), (list(batch["positive"]), "document"), (negatives, "document")]
        autocast = _autocast_state(self.device)
        chunks: list[tuple[list[str], str, Any]] = []
        embeddings: list[torch.Tensor | None] = []
        with torch.no_grad():
            for texts, role in groups:
                parts = []
                for start in range(0, len(texts), self.chunk_size):
                    chunk = texts[start:start + self.chunk_size]
                    state = _rng_state(self.device)
                    parts.append(self.embed(chunk, role))
                    chunks.append((chunk, role, state))
                embeddings.append(torch.cat(parts) if parts else None)
        leaves = [e.detach().requires_grad_() if e is not None else None for e in embeddings]
        with torch.enable_grad():
            loss = self.loss_from_embeddings(leaves[0], leaves[1], leaves[2], batch)
            used = [leaf for leaf in leaves if leaf is not None]
            grads = torch.autograd.grad(loss, used)
        chunk_grads = [g for grad in grads for g in grad.split(self.chunk_size)]
        params = [p for p in self.parameters() if p.requires_grad]
        replay = functools.partial(self._replay, chunks, chunk_grads, params, autocast)
        return _GradCacheLoss.apply(loss.detach(), replay, *params)

    def _replay(self, chunks: list[tuple[list[str], str, Any]], grads: list[torch.Tensor],
                params: list[nn.Parameter], autocast: tuple[str, torch.dtype] | None,
                grad_output: torch.Tensor) -> list[torch.Tensor]:
        totals = [torch.zeros_like(p) for p in params]
        for (chunk, role, state), grad in zip(chunks, grads, strict=True):
            with torch.random.fork_rng(devices=_rng_devices(self.device)), torch.enable_grad(), \
                    _autocast(autocast):
                _set_rng_state(self.device, state)
                emb = self.embed(chunk, role)
                found = torch.autograd.grad(emb, params, grad * grad_output, allow_unused=True)
            for total, g in zip(totals, found, strict=True):
                if g is not None:
                    total.add_(g)
        return totals
