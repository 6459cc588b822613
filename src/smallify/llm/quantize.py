"""Weight-only quantization of a causal LM, block by block: ``quantize_llm(model, config, data, tokenizer)``.

Data-driven methods (GPTQ, AWQ) capture what the first decoder block receives for the calibration windows,
then for each block: collect the input second moments H = X^T X of every group of Linears that read the same
tensor, (AWQ) fold searched input scales into the op producing that tensor, quantize each Linear (GPTQ's
column loop, or AWQ's clipping search), and run the quantized block to get the next block's inputs. Peak
memory is the model plus one block's statistics and the calibration hidden states. With ``checkpoint`` each
finished block is written to a folder and a killed run resumes after the last finished block.
Data-free methods (RTN, DataFree) quantize each Linear on its own.

The model is quantized in place (an LLM is not copied) and returned; its Linears become ``QuantLinear``
twins holding the grid, so ``smallify.save``, ``save_hf`` and ``save_gguf`` write it."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from torch import nn

from smallify import files
from smallify.errors import ConfigError, DataError, ModelError
from smallify.llm import awq as awq_math
from smallify.llm import grid
from smallify.llm.blocks import (
    Captured,
    capture,
    decoder_blocks,
    linear_layers,
    run_block,
    weight_view,
)
from smallify.llm.config import AWQ, GPTQ, RTN, DataFree, LLMWeightOnly
from smallify.llm.gptq import gptq, minmax_fit, search_fit
from smallify.progress import track
from smallify.quant import modules as qmod
from smallify.quant.config import first_match
from smallify.quant.report import LayerReport, QuantReport

BATCH = 4   # calibration windows per forward


def make_twin(m: nn.Module, spec: qmod.WeightSpec, q: torch.Tensor, scale: torch.Tensor,
              zero: torch.Tensor) -> qmod.QuantTwin:
    """The twin of ``m`` holding integers ``q`` (O, I) on the per-group grid (scale, zero) (O, G)."""
    twin = qmod.lookup(m).from_float(m, spec)
    if spec.group_size is None:
        scale, zero = scale.reshape(-1), zero.reshape(-1)
    with torch.no_grad():
        twin.weight.copy_(grid.dequantize(q, scale.reshape(q.shape[0], -1), zero.reshape(q.shape[0], -1),
                                          spec.group_size).to(twin.weight.dtype))
    twin.weight_scale = scale.float().clone()
    twin.weight_zero_point = zero.to(torch.int32).clone()
    return twin


def _fit_data_free(w: torch.Tensor, config: LLMWeightOnly, fmt, group: int | None):
    if isinstance(config, RTN):
        return grid.minmax(w, fmt, group)
    return grid.search(w, fmt, group, steps=config.grid, refits=config.refits, importance=config.importance)


def _windows(data, tokenizer, config: LLMWeightOnly) -> torch.Tensor:
    if data is None:
        raise DataError(f"{type(config).__name__} calibrates on text: pass data= (a list of strings, a .txt or "
                        ".jsonl path, or token ids [N, T]) and tokenizer=; RTN and DataFree need no data")
    from smallify.llm.text import calibration_windows

    return calibration_windows(data, tokenizer, config.samples, config.seq_len)


def _collect(block: nn.Module, layers: dict[str, nn.Module], batches: list[Captured]):
    """Per group of layers reading one tensor: (member names, H = X^T X (float64), mean |x| per channel)."""
    groups: dict[str, list[str]] = {}
    stats: dict[str, list] = {}
    seen: dict[int, tuple[str, torch.Tensor]] = {}   # data_ptr -> (leader, the tensor, kept alive so that
                                                       # its memory is not reused by a later input this batch)

    def hook_for(name):
        def hook(module, args):
            x = args[0]
            ptr = x.data_ptr()
            if ptr in seen and seen[ptr][1].shape == x.shape:
                leader = seen[ptr][0]
                if name not in groups[leader]:
                    groups[leader].append(name)
                return
            seen[ptr] = (name, x)
            groups.setdefault(name, [name])
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            h, a, n = stats.setdefault(name, [0.0, 0.0, 0])
            stats[name] = [h + (x2.T @ x2).double(), a + x2.abs().sum(0).double(), n + x2.shape[0]]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    try:
        for batch in batches:
            seen.clear()
            run_block(block, batch)
    finally:
        for h in handles:
            h.remove()
    return [(members, stats[leader][0], (stats[leader][1] / stats[leader][2]).float())
            for leader, members in groups.items()]


class Checkpoint:
    """A folder holding each finished block and the hidden states after it; ``done`` blocks are skipped on
    resume (the fingerprint ties the folder to one model, config and calibration set)."""

    def __init__(self, folder, fingerprint: str):
        self.folder, self.fingerprint = Path(folder), fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state = {"fingerprint": fingerprint, "done": 0, "layers": {}}
        meta = self.folder / "progress.json"
        if meta.exists():
            state = json.loads(meta.read_text())
            if state.get("fingerprint") != fingerprint:
                raise ConfigError(f"checkpoint folder {self.folder} belongs to another model, config or "
                                  "calibration text; remove it or choose another folder")
            self.state = state

    @property
    def done(self) -> int:
        return int(self.state["done"])

    def restore(self, blocks: nn.ModuleList, prefix: str, batches: list[Captured], config: LLMWeightOnly) -> None:
        from safetensors.torch import load_file

        from smallify.pack.container import _spec_from

        for i in range(self.done):
            block = blocks[i]
            for name, info in self.state["layers"].get(str(i), {}).items():
                m = block.get_submodule(name)
                qmod.replace_module(block, name, qmod.lookup(m).from_float(m, _spec_from(info, name)))
            block.load_state_dict(load_file(str(self.folder / f"block_{i:04d}.safetensors")))
        if self.done and batches:
            hidden = load_file(str(self.folder / self.state.get("hidden", "hidden.safetensors")))
            for j, b in enumerate(batches):
                b.hidden = hidden[str(j)]

    def save(self, i: int, block: nn.Module, batches: list[Captured], specs: dict) -> None:
        from safetensors.torch import save_file

        from smallify.pack.container import _spec_dict

        state = {k: v.detach().contiguous().clone() for k, v in block.state_dict().items()}
        files.write_atomic(self.folder / f"block_{i:04d}.safetensors", lambda tmp: save_file(state, tmp))
        if batches:     # a new file per block: the one progress.json names stays valid until it is replaced
            hidden = {str(j): b.hidden.contiguous() for j, b in enumerate(batches)}
            name = f"hidden_{i:04d}.safetensors"
            files.write_atomic(self.folder / name, lambda tmp: save_file(hidden, tmp))
            self.state["hidden"] = name
        self.state["layers"][str(i)] = {n: _spec_dict(s) for n, s in specs.items()}
        self.state["done"] = i + 1
        text = json.dumps(self.state)
        files.write_atomic(self.folder / "progress.json", lambda tmp: Path(tmp).write_text(text))
        for old in self.folder.glob("hidden_*.safetensors"):
            if old.name != self.state.get("hidden"):
                old.unlink(missing_ok=True)


def _fingerprint(model: nn.Module, config: LLMWeightOnly, windows: torch.Tensor | None) -> str:
    h = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode())
    h.update(type(model).__name__.encode())
    for p in list(model.parameters())[:4]:
        h.update(p.detach().float().flatten()[:4096].numpy().tobytes())
    if windows is not None:
        h.update(windows.numpy().tobytes())
    return h.hexdigest()


def quantize_llm(model: nn.Module, config: LLMWeightOnly, data=None, tokenizer=None, progress: bool = True,
                 checkpoint=None) -> nn.Module:
    """Quantize the Linears of ``model``'s decoder blocks (and the LM head with ``config.lm_head``) in place."""
    if not isinstance(config, LLMWeightOnly):
        raise ConfigError(f"quantize_llm takes RTN, DataFree, GPTQ or AWQ; got {type(config).__name__}")
    if isinstance(config, DataFree) and config.generated:
        return _self_calibrated(model, config, progress, checkpoint)
    start = time.perf_counter()
    prefix, blocks = decoder_blocks(model)
    model.eval()
    windows = _windows(data, tokenizer, config) if config.uses_data else None
    batches = capture(model, blocks, windows, BATCH) if windows is not None else []
    ckpt = Checkpoint(checkpoint, _fingerprint(model, config, windows)) if checkpoint is not None else None
    if ckpt is not None:
        ckpt.restore(blocks, prefix, batches, config)
    use_awq = isinstance(config, AWQ) or (isinstance(config, GPTQ) and config.awq)
    producers: dict[tuple[str, ...], str | None] = {}
    reports: list[LayerReport] = []
    for i in track(range(len(blocks)), f"{config.describe()}: blocks", enabled=progress):
        block = blocks[i]
        layers = {n: m for n, m in linear_layers(block).items()
                  if not first_match(config.skip, (f"{prefix}.{i}.{n}",))}
        if ckpt is not None and i < ckpt.done:
            reports += _reports_of(block, prefix, i, config)
            continue
        specs = {}
        if config.uses_data:
            groups = _collect(block, layers, batches)
            for members, h, x_mean in groups:
                if use_awq:
                    key = tuple(members)
                    if key not in producers:
                        producers[key] = awq_math.find_producer(block, members, batches[0])
                    if producers[key] is not None:
                        fmt = config.fmt
                        weights = [weight_view(layers[n]).detach().float() for n in members]
                        group = config.spec(weights[0].shape[1])[1]

                        def rtn(w, fmt=fmt, group=group):
                            s, z = grid.minmax(w, fmt, group)
                            return grid.dequantize(grid.integers(w, s, z, fmt, group), s, z, group)

                        with one_thread():
                            s, _, _ = awq_math.search_scale(weights, h.float(), x_mean, rtn, getattr(config, "grid", 20))
                        awq_math.fold(block, producers[key], members, s)
                        h = h / s.double()[:, None] / s.double()[None, :]
                if isinstance(config, GPTQ):     # one column loop for the whole group: rows are independent
                    specs.update(_gptq_group(block, members, layers, config, h))
                else:
                    for n in members:
                        specs[n] = _quantize_layer(block, n, layers[n], config, h)
        else:
            for n, m in layers.items():
                specs[n] = _quantize_layer(block, n, m, config, None)
        for batch in batches:
            batch.hidden = run_block(block, batch)
        reports += _reports_of(block, prefix, i, config)
        if ckpt is not None:
            ckpt.save(i, block, batches, specs)
    reports += _head(model, config)
    model.quant_config = config
    model.quant_report = model.report = QuantReport(
        config.to_dict(), reports, 0, 0 if windows is None else int(windows.shape[0]), time.perf_counter() - start,
        config.describe())
    return model


class one_thread:
    """Torch on one thread inside: GPTQ's column loop and the grid searches are thousands of small ops, which
    two threads slow down (measured on a busy 2-core machine: a 1536 x 576 GPTQ layer 44 s on two threads,
    0.5 s on one)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _quantize_layer(block: nn.Module, name: str, m: nn.Module, config: LLMWeightOnly,
                    h: torch.Tensor | None) -> qmod.WeightSpec:
    with one_thread():
        return _quantize_layer_math(block, name, m, config, h)


def _quantize_layer_math(block: nn.Module, name: str, m: nn.Module, config: LLMWeightOnly,
                         h: torch.Tensor | None) -> qmod.WeightSpec:
    w = weight_view(m).detach().float()
    spec, group = config.spec(w.shape[1])
    fmt = spec.fmt
    if isinstance(config, GPTQ):
        fit = search_fit(fmt) if config.mse else minmax_fit(fmt)
        q, scale, zero = gptq(w, h, fmt, group, fit, config.act_order, config.damp, config.block_size)
    elif isinstance(config, AWQ):
        hb = awq_math.hessian_blocks(h.float(), group) if config.clip else None
        scale, zero = grid.search(w, fmt, group, steps=config.grid if config.clip else 1, hessian_blocks=hb)
        q = grid.integers(w, scale, zero, fmt, group)
    else:
        scale, zero = _fit_data_free(w, config, fmt, group)
        q = grid.integers(w, scale, zero, fmt, group)
    qmod.replace_module(block, name, make_twin(m, spec, q, scale, zero))
    return spec


def generate_windows(model: nn.Module, count: int, seq_len: int, seed: int = 0, batch: int = 8) -> torch.Tensor:
    """(count, seq_len) token ids the model samples itself (temperature 1, from its BOS token, no EOS stop)."""
    config = getattr(model, "config", None)
    bos = getattr(config, "bos_token_id", None)
    if bos is None:
        bos = getattr(config, "eos_token_id", None)
    if isinstance(bos, (list, tuple)):
        bos = bos[0]
    if bos is None or not hasattr(model, "generate"):
        raise ModelError(f"{type(model).__name__} has no BOS/EOS token or generate(): it cannot write its own "
                         "calibration text; pass text (GPTQ/AWQ) or use DataFree(generated=0)")
    torch.manual_seed(seed)
    rows = []
    with torch.no_grad():
        for i in range(0, count, batch):
            n = min(batch, count - i)
            start = torch.full((n, 1), int(bos), dtype=torch.long)
            out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=seq_len, min_new_tokens=seq_len,
                                 pad_token_id=int(bos))
            rows.append(out[:, 1:seq_len + 1])
    return torch.cat(rows)


def _self_calibrated(model: nn.Module, config: DataFree, progress: bool, checkpoint) -> nn.Module:
    """DataFree(generated=N): GPTQ on N windows the model writes itself."""
    start = time.perf_counter()
    windows = generate_windows(model, config.generated, config.seq_len)
    fields = {k: getattr(config, k) for k in ("bits", "group_size", "sym", "lm_head", "lm_head_bits", "skip",
                                              "seq_len")}
    quantize_llm(model, GPTQ(samples=config.generated, **fields), windows, None, progress, checkpoint)
    model.quant_config = config
    report = model.quant_report
    report.config, report.scheme = config.to_dict(), config.describe() + f" (GPTQ on {config.generated} generated windows)"
    report.calibration_seconds = time.perf_counter() - start
    return model


def _gptq_group(block: nn.Module, members: list[str], layers: dict, config: GPTQ,
                h: torch.Tensor) -> dict[str, qmod.WeightSpec]:
    """GPTQ on the Linears that read one input, stacked row-wise: they share H, so one column loop (and one
    Cholesky factor) gives each row exactly what its own run would."""
    weights = [weight_view(layers[n]).detach().float() for n in members]
    spec, group = config.spec(weights[0].shape[1])
    fit = search_fit(spec.fmt) if config.mse else minmax_fit(spec.fmt)
    with one_thread():
        q, scale, zero = gptq(torch.cat(weights), h, spec.fmt, group, fit, config.act_order, config.damp,
                              config.block_size)
    row = 0
    for n, w in zip(members, weights):
        rows = slice(row, row + w.shape[0])
        qmod.replace_module(block, n, make_twin(layers[n], spec, q[rows], scale[rows], zero[rows]))
        row += w.shape[0]
    return {n: spec for n in members}


def _reports_of(block: nn.Module, prefix: str, i: int, config: LLMWeightOnly) -> list[LayerReport]:
    out = []
    for n, m in block.named_modules():
        full = f"{prefix}.{i}.{n}"
        if isinstance(m, qmod.QuantTwin):
            note = ""
            if m.spec.group_size != config.group_size:
                note = (f" (group_size {config.group_size} does not divide {m.weight.shape[1]} input channels: "
                        f"{'group ' + str(m.spec.group_size) if m.spec.group_size else 'per channel'})")
            out.append(LayerReport(full, type(m).__name__, "quantized", m.spec.describe() + note))
        elif qmod.lookup(m) is not None and qmod.lookup(m).kind == "linear":
            out.append(LayerReport(full, type(m).__name__, "float",
                                   f"skipped by pattern {first_match(config.skip, (full,))!r}"))
    return out


def _head(model: nn.Module, config: LLMWeightOnly) -> list[LayerReport]:
    """The LM head: kept float (listed), or quantized data-free at ``lm_head_bits`` (untied from the input
    embedding, which stays float)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        out.append(LayerReport(names.get(id(emb), "embeddings"), type(emb).__name__, "float",
                               "input embedding kept float (a lookup: no matmul to speed up)"))
    if head is None or qmod.lookup(head) is None:
        return out
    name = names[id(head)]
    tied = emb is not None and head.weight is getattr(emb, "weight", None)
    if not config.lm_head:
        out.append(LayerReport(name, type(head).__name__, "float",
                               "LM head kept float (lm_head=False)" + ("; tied to the input embedding" if tied else "")))
        return out
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone())
        if getattr(model.config, "tie_word_embeddings", None) is not None:
            model.config.tie_word_embeddings = False
    w = weight_view(head).detach().float()
    spec, group = config.spec(w.shape[1], head=True)
    scale, zero = grid.search(w, spec.fmt, group, steps=20, refits=4)
    qmod.replace_module(model, name, make_twin(head, spec, grid.integers(w, scale, zero, spec.fmt, group),
                                               scale, zero))
    out.append(LayerReport(name, type(head).__name__, "quantized",
                           spec.describe() + (" (untied from the input embedding)" if tied else "")))
    return out


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise ModelError(f"cannot quantize a {type(model).__name__} with an LLM method; accepted: a transformers "
                         "causal LM, a Hugging Face folder or a .gguf file")
