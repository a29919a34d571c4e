"""Embedding family (text path): a Hugging Face encoder trained contrastively with in-batch InfoNCE.

Batches are ``{"query": [str], "positive": [str], "negatives": [[str]]?}``; the head tokenizes them
itself, so any datamodule that yields text pairs works. Validation retrieves every validation query
against the whole validation corpus and reports recall@k, MRR@10 and NDCG@10 (torchmetrics).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG, RetrievalRecall

from lightning_lora.errors import UserError
from lightning_lora.heads.base import StepOutput, TaskHead

POOLINGS = ("mean", "cls", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Sentence vector from token states: masked mean, the first token, or the last non-pad token."""
    if how == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    if how == "cls":
        return hidden[:, 0]
    last = mask.sum(1) - 1  # right padding: the last real token of each row
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


def info_nce(q: torch.Tensor, candidates: torch.Tensor, temperature: float,
             same_as_positive: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each query against every candidate; query i's positive is candidate i.

    ``same_as_positive[i, j]`` marks candidates that duplicate query i's positive (same text): they are
    masked out, because scoring them as negatives would punish the right answer.
    """
    logits = q @ candidates.T / temperature
    if same_as_positive is not None:
        logits = logits.masked_fill(same_as_positive, float("-inf"))
    labels = torch.arange(q.size(0), device=q.device)
    return F.cross_entropy(logits.float(), labels)


def duplicate_mask(positives: list[str], candidates: list[str], device: torch.device) -> torch.Tensor | None:
    """[B, C] True where candidate j has the same text as positive i (but is not i's own slot)."""
    index: dict[str, list[int]] = {}
    for j, text in enumerate(candidates):
        index.setdefault(text, []).append(j)
    pairs = [(i, j) for i, text in enumerate(positives) for j in index.get(text, []) if j != i]
    if not pairs:
        return None
    mask = torch.zeros(len(positives), len(candidates), dtype=torch.bool, device=device)
    rows, cols = zip(*pairs, strict=True)
    mask[list(rows), list(cols)] = True
    return mask


def retrieval_metrics(queries: torch.Tensor, docs: torch.Tensor, ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    """Query i's only relevant document is doc i; rank the whole corpus for every query."""
    n = queries.size(0)
    scores = (queries.float() @ docs.float().T).flatten()
    target = torch.eye(n, dtype=torch.bool, device=scores.device).flatten()
    indexes = torch.arange(n, device=scores.device).repeat_interleave(n)
    metrics = {f"recall@{k}": RetrievalRecall(top_k=k) for k in ks}
    metrics |= {"mrr@10": RetrievalMRR(top_k=10), "ndcg@10": RetrievalNormalizedDCG(top_k=10)}
    return {name: float(m(scores, target, indexes=indexes)) for name, m in metrics.items()}


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints a progress bar and a report of weights the encoder does not use (the BERT pooler)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class EmbeddingHead(TaskHead):
    """Sentence embeddings from a local Hugging Face encoder folder (``model.pretrained=PATH``).

    ``config_overrides`` change the Hugging Face config at load time (e.g. ``hidden_dropout_prob: 0.0``).
    BERT-style encoders are loaded without their pooler: mean/CLS/last-token pooling never uses it, and a
    LoRA target like ``dense`` would otherwise also hit ``pooler.dense``, whose adapter then gets no
    gradient (and breaks DDP with unused parameters).
    """

    family: ClassVar[str] = "embedding"
    monitor: ClassVar[str] = "val/recall@1"
    monitor_mode: ClassVar[str] = "max"

    def __init__(
        self,
        pretrained: str,
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
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(f"model.pooling={pooling!r} is unknown; valid: {', '.join(POOLINGS)}")
        if not temperature > 0:
            raise UserError(f"model.temperature={temperature} must be > 0 (e.g. 0.05)")
        path = Path(os.path.expanduser(str(pretrained)))
        if not (path / "config.json").is_file():
            raise UserError(f"model.pretrained: no Hugging Face model folder (config.json) at {path}")
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        overrides = dict(config_overrides or {})
        config = AutoConfig.from_pretrained(path, **overrides)
        extra = {"add_pooling_layer": False} if config.model_type == "bert" else {}
        with _quiet_transformers():
            self.encoder = AutoModel.from_pretrained(path, config=config, **extra)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.pretrained = str(path)
        self.name = name or path.name
        self.targets = list(targets)
        self.pooling, self.temperature, self.symmetric = pooling, float(temperature), symmetric
        self.query_max_length, self.doc_max_length = query_max_length, doc_max_length
        self.query_prefix, self.doc_prefix = query_prefix, doc_prefix

    # ------------------------------------------------------------------ TaskHead
    def adaptable_submodules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder}

    def default_targets(self) -> dict[str, list[str]]:
        return {"encoder": self.targets}

    def base_model_identity(self) -> dict[str, str]:
        return {"name": self.name, "path": self.pretrained}

    def enable_gradient_checkpointing(self) -> None:
        self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ------------------------------------------------------------------ encoding
    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def encode(self, texts: list[str], max_length: int, prefix: str = "") -> torch.Tensor:
        """L2-normalised embeddings [len(texts), dim]."""
        tokens = self.tokenizer(
            [prefix + t for t in texts], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.encoder(**tokens).last_hidden_state
        return F.normalize(pool(hidden, tokens["attention_mask"], self.pooling).float(), dim=-1)

    def encode_queries(self, texts: list[str]) -> torch.Tensor:
        return self.encode(texts, self.query_max_length, self.query_prefix)

    def encode_documents(self, texts: list[str]) -> torch.Tensor:
        return self.encode(texts, self.doc_max_length, self.doc_prefix)

    # ------------------------------------------------------------------ objective
    def contrastive_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        queries, positives = batch["query"], batch["positive"]
        negatives = [n for row in batch.get("negatives", []) for n in row]
        candidates = positives + negatives
        q = self.encode_queries(queries)
        c = self.encode_documents(candidates)
        loss = info_nce(q, c, self.temperature, duplicate_mask(positives, candidates, q.device))
        if self.symmetric:  # positives retrieving their queries (negatives have no query to find)
            p = c[: len(positives)]
            loss = (loss + info_nce(p, q, self.temperature, duplicate_mask(queries, queries, q.device))) / 2
        return loss

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        return StepOutput(self.contrastive_loss(batch), batch_size=len(batch["query"]))

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        q = self.encode_queries(batch["query"])
        d = self.encode_documents(batch["positive"])
        loss = info_nce(q, d, self.temperature, duplicate_mask(batch["positive"], batch["positive"], q.device))
        out = {"loss": loss, "query_emb": q, "doc_emb": d}
        if "index" in batch:
            out["index"] = batch["index"].to(q.device)
        return out

    def validation_metrics(self, collected: dict[str, torch.Tensor]) -> dict[str, float]:
        return retrieval_metrics(collected["query_emb"], collected["doc_emb"])
