"""The .smallify container: one safetensors file (packed low-bit weights, scales, every other tensor) whose
metadata holds the manifest (config, layer grids). Loading never executes code from the file."""
from smallify.pack.container import fit_shapes, load, save

__all__ = ["save", "load", "fit_shapes"]
