"""The candidates a search tries, family by family. Quick ones (no training) first; structural ones (pruning,
low-rank) are first built without fine-tuning, timed and scored, and only the most promising are then
fine-tuned by distillation from the float model."""
from __future__ import annotations

from smallify.tune.goal import Goal
from smallify.tune.recipe import Recipe, step


def quantizers(goal: Goal, kind: str) -> list:
    """The quantization configs tried on their own and after other steps."""
    import smallify as sm

    configs = [sm.Int8Static(), sm.Int8Static(calibration="percentile")]
    if kind == "onnx":
        configs.append(sm.Int8Dynamic())
    configs.append(sm.MixedPrecision(candidates=(8,) if goal.objective == "latency" else (8, 4),
                                     max_drop=float(goal.max_drop)))
    configs.append(sm.Float16())
    if goal.objective == "size":
        configs += [sm.Int8Static(weight_bits=4), sm.WeightOnly(bits=4)]
    return configs


def quick(goal: Goal, kind: str) -> list[Recipe]:
    """Recipes without training: every quantizer alone, and k-means sharing before INT8 (PyTorch models)."""
    import smallify as sm

    base = Recipe(seed=goal.seed)
    recipes = []
    if "quantize" in goal.families:
        recipes += [base.then(step("quantize", c)) for c in quantizers(goal, kind)]
    if kind == "torch" and "cluster" in goal.families:
        for bits in (4, 6) if goal.objective == "size" else (6,):
            recipes.append(base.then(step("cluster", sm.KMeans(bits=bits)), step("quantize", sm.Int8Static())))
    return recipes


def structural(goal: Goal) -> list[Recipe]:
    """Pruning and low-rank recipes before fine-tuning, each followed by INT8 when quantization is allowed."""
    import smallify as sm

    base = Recipe(seed=goal.seed)
    shapes = []
    if "prune" in goal.families:
        shapes += [step("prune", sm.ChannelPrune(ratio=r, importance="l2", reconstruct=True, round_to=8))
                   for r in (0.3, 0.5, 0.7)]
        # whole residual branches removed (on CPU runtimes what removes per-layer overhead), alone and with channels
        shapes += [step("prune", sm.ChannelPrune(ratio=r, importance="l2", reconstruct=True, round_to=8, branches=2))
                   for r in (0.0, 0.3, 0.5)]
    if "decompose" in goal.families:
        shapes += [step("decompose", sm.LowRank(macs=m, runtime=goal.runtime, batch=max(goal.batch),
                                                threads=goal.threads)) for m in (0.5, 0.35)]
    tail = (step("quantize", sm.Int8Static()),) if "quantize" in goal.families else ()
    return [base.then(s, *tail) for s in shapes]


def finetuned(recipe: Recipe, goal: Goal) -> Recipe:
    """``recipe`` with a distillation step after its structural steps (before quantization)."""
    import smallify as sm

    distill = step("distill", sm.KD(output_loss=goal.distill_loss), sm.TrainConfig(epochs=goal.epochs, lr=goal.lr, seed=goal.seed))
    head = tuple(s for s in recipe.steps if s.verb != "quantize")
    tail = tuple(s for s in recipe.steps if s.verb == "quantize")
    return Recipe(head + (distill,) + tail, recipe.seed)


def shared_after(recipe: Recipe, goal: Goal) -> Recipe:
    """``recipe`` with k-means sharing (4 bits) before its quantization: the smallest container."""
    import smallify as sm

    head = tuple(s for s in recipe.steps if s.verb != "quantize")
    tail = tuple(s for s in recipe.steps if s.verb == "quantize")
    return Recipe(head + (step("cluster", sm.KMeans(bits=4)),) + tail, recipe.seed)
