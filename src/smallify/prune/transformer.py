"""Attention-head and FFN-neuron pruning of BERT-style encoders (BERT, RoBERTa, MiniLM: layers with
``attention.self.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense``, ``output.dense``).

A head is a block of ``head_size`` rows of query, key and value and the matching columns of the attention
output projection; an FFN neuron is a row of ``intermediate.dense`` and a column of ``output.dense``. Both are
removed physically, so the encoder does less work. Importance: ``l2`` (weight norms of the head's or neuron's
rows and columns) or ``activation`` (on ``data``: the mean norm of what the head or neuron outputs times the
norm of the weights that read it — how much it contributes to the residual stream).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from smallify.config import Config, check_config
from smallify.report import attach
from smallify.errors import ConfigError, DataError, ModelError
from smallify.measure.macs import count_params


@dataclasses.dataclass
class AttentionPrune(Config):
    """Remove ``head_ratio`` of the attention heads and ``ffn_ratio`` of the FFN neurons of every layer
    (each in [0, 1)), ranked by ``importance`` ('l2' or 'activation', which needs data)."""

    kind = "attention_prune"
    verbs = ("prune_attention",)
    head_ratio: float = 0.33
    ffn_ratio: float = 0.33
    importance: str = "activation"

    def __post_init__(self):
        for name in ("head_ratio", "ffn_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ConfigError(f"{name}={v!r} is not supported; accepted: a number in [0, 1)")
        if self.importance not in ("l2", "activation"):
            raise ConfigError(f"importance={self.importance!r} is not supported; accepted: 'l2', 'activation'")


@dataclasses.dataclass
class _Block:
    name: str
    attn: nn.Module          # has query, key, value, attention_head_size
    out: nn.Linear           # attention output projection
    up: nn.Linear            # intermediate.dense
    down: nn.Linear          # output.dense


def find_blocks(model: nn.Module) -> list[_Block]:
    blocks = []
    for name, m in model.named_modules():
        att = getattr(getattr(m, "attention", None), "self", None)
        if att is None or not all(isinstance(getattr(att, k, None), nn.Linear) for k in ("query", "key", "value")):
            continue
        try:
            blocks.append(_Block(name, att, m.attention.output.dense, m.intermediate.dense, m.output.dense))
        except AttributeError:
            continue
    if not blocks:
        raise ModelError(f"{type(model).__name__} has no BERT-style layer (attention.self.query/key/value, "
                         "attention.output.dense, intermediate.dense, output.dense)")
    return blocks


def _call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(*batch) if isinstance(batch, (tuple, list)) else model(batch)


def _activation_stats(model, blocks, data):
    sums = {}
    handles = []
    for b in blocks:
        for key, lin in (("heads", b.out), ("ffn", b.down)):
            def hook(m, args, out, k=(b.name, key)):
                x = args[0].detach()
                sums[k] = sums.get(k, 0) + x.abs().reshape(-1, x.shape[-1]).mean(0)
            handles.append(lin.register_forward_hook(hook))
    try:
        with torch.no_grad():
            n = 0
            for batch in data:
                _call(model, batch)
                n += 1
    finally:
        for h in handles:
            h.remove()
    if not sums:
        raise DataError("importance 'activation' needs data= (batches the model takes)")
    return sums


def prune_attention(model: nn.Module, config: AttentionPrune | None = None, data=None) -> nn.Module:
    """A copy of ``model`` with heads and FFN neurons removed; ``prune_report`` lists each layer."""
    config = check_config(config, AttentionPrune, "prune_attention") or AttentionPrune()
    model = copy.deepcopy(model).eval()
    params0 = count_params(model)
    blocks = find_blocks(model)
    if config.importance == "activation" and data is None:
        raise DataError("importance 'activation' needs data= (batches the model takes)")
    stats = _activation_stats(model, blocks, data) if config.importance == "activation" else None
    report = []
    for b in blocks:
        hd = b.attn.attention_head_size
        heads = b.attn.query.out_features // hd
        col = b.out.weight.detach().norm(dim=0)                          # per input feature of the projection
        if stats is not None:
            head_score = (stats[(b.name, "heads")] * col).reshape(heads, hd).sum(1)
        else:
            rows = torch.cat([getattr(b.attn, k).weight.detach() for k in ("query", "key", "value")], 1)
            head_score = (rows.pow(2).sum(1) + b.out.weight.detach().pow(2).sum(0)).reshape(heads, hd).sum(1)
        keep_heads = max(1, int(heads * (1 - config.head_ratio) + 1e-9))
        kept = torch.sort(torch.topk(head_score, keep_heads).indices).values
        idx = (kept[:, None] * hd + torch.arange(hd)[None, :]).flatten()
        with torch.no_grad():
            for k in ("query", "key", "value"):
                lin = getattr(b.attn, k)
                setattr(b.attn, k, _rows(lin, idx))
            b_out = _cols(b.out, idx)
        _replace(model, b.out, b_out)
        for attr in ("num_attention_heads",):
            if hasattr(b.attn, attr):
                setattr(b.attn, attr, keep_heads)
        if hasattr(b.attn, "all_head_size"):
            b.attn.all_head_size = keep_heads * hd
        n_ffn = b.up.out_features
        down_col = b.down.weight.detach().norm(dim=0)
        ffn_score = stats[(b.name, "ffn")] * down_col if stats is not None else \
            b.up.weight.detach().norm(dim=1) * down_col
        keep_ffn = max(1, int(n_ffn * (1 - config.ffn_ratio) + 1e-9))
        kept_f = torch.sort(torch.topk(ffn_score, keep_ffn).indices).values
        with torch.no_grad():
            up, down = _rows(b.up, kept_f), _cols(b.down, kept_f)
        _replace(model, b.up, up)
        _replace(model, b.down, down)
        report.append({"layer": b.name, "heads": [heads, keep_heads], "ffn": [n_ffn, keep_ffn]})
    return attach(model, AttentionPruneReport(config.to_dict(), report, [params0, count_params(model)]), "prune_report")


@dataclasses.dataclass
class AttentionPruneReport:
    config: dict
    layers: list[dict]            # per block: {"layer", "heads": [before, after], "ffn": [before, after]}
    params: list[int]             # [before, after]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __getitem__(self, key: str):          # the older dict form: report["layers"]
        return getattr(self, key)

    def __str__(self) -> str:
        lines = [f"params {self.params[0]:,} -> {self.params[1]:,} ({self.params[1] / self.params[0]:.3f}x)"]
        lines += [f"  {l['layer']}: heads {l['heads'][0]} -> {l['heads'][1]}, FFN {l['ffn'][0]} -> {l['ffn'][1]}"
                  for l in self.layers]
        return "\n".join(lines)


def _rows(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, len(idx), lin.bias is not None)
    new.weight = nn.Parameter(lin.weight[idx].clone())
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias[idx].clone())
    return new


def _cols(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(idx), lin.out_features, lin.bias is not None)
    new.weight = nn.Parameter(lin.weight[:, idx].clone())
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias.clone())
    return new


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, m in model.named_modules():
        for child_name, child in m.named_children():
            if child is old:
                setattr(m, child_name, new)
                return
    raise ModelError("internal: layer to replace not found")
