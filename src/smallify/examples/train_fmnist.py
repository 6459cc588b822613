"""Train the bundled Fashion-MNIST ResNet and write its weights as safetensors.

    python -m smallify.examples.train_fmnist --epochs 12 --out src/smallify/examples/weights/fmnist_resnet.safetensors

A checkpoint (safetensors + JSON, no pickles) is written after every epoch next to ``--out``; running the
same command again resumes from it.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from smallify.examples import fashion_mnist
from smallify.examples.models import fmnist_resnet


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 2-pixel shifts (pad + crop) and horizontal flips, on a batch (B, 1, 28, 28)."""
    b = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), value=float(-fashion_mnist.MEAN / fashion_mnist.STD))
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    x = padded[:, :, dy:dy + 28, dx:dx + 28]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files")
    ap.add_argument("--out", default="fmnist_resnet.safetensors")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    xtr, ytr = fashion_mnist.load("train", args.data)
    xte, yte = fashion_mnist.load("test", args.data)
    xtr, xte = torch.from_numpy(fashion_mnist.normalize(xtr)), torch.from_numpy(fashion_mnist.normalize(xte))
    ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
    model = fmnist_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(xtr) / args.batch)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    out = Path(args.out)
    ckpt, meta_path = out.with_suffix(".ckpt.safetensors"), out.with_suffix(".ckpt.json")
    start = 0
    if ckpt.exists() and meta_path.exists():
        state = load_file(ckpt)
        model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        opt.load_state_dict(json.loads(meta_path.read_text())["opt"] | {"state": {}})
        for i, p in enumerate(model.parameters()):
            if f"mom.{i}" in state:
                opt.state[p]["momentum_buffer"] = state[f"mom.{i}"]
        start = json.loads(meta_path.read_text())["epoch"]
        for _ in range(start * steps_per_epoch):
            sched.step()
        print(f"resumed after epoch {start}")
    for epoch in range(start, args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        t0, seen, loss_sum = time.time(), 0, 0.0
        for i in range(0, len(xtr), args.batch):
            idx = perm[i:i + args.batch]
            loss = F.cross_entropy(model(augment(xtr[idx], gen)), ytr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen, loss_sum = seen + len(idx), loss_sum + float(loss) * len(idx)
        acc = evaluate(model, xte, yte)
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss_sum / seen:.4f} test top-1 {acc:.4f} ({time.time() - t0:.0f} s)",
              flush=True)
        state = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
        state |= {f"mom.{i}": opt.state[p]["momentum_buffer"] for i, p in enumerate(model.parameters())
                  if "momentum_buffer" in opt.state[p]}
        save_file(state, ckpt)
        opt_meta = {k: v for k, v in opt.state_dict().items() if k != "state"}
        meta_path.write_text(json.dumps({"epoch": epoch + 1, "opt": opt_meta}))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out,
              metadata={"test_top1": f"{evaluate(model, xte, yte):.4f}", "epochs": str(args.epochs)})
    ckpt.unlink(missing_ok=True)
    meta_path.unlink(missing_ok=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
