"""Weight-only quantization of Hugging Face causal LMs (RTN, DataFree, GPTQ, AWQ), their calibration text,
and the files their runtimes load (Hugging Face folders, GGUF).

    import smallify as sm
    model, tok, _ = sm.llm.load_causal_lm("model_dir_or.gguf")
    sm.quantize(model, sm.llm.GPTQ(bits=4, group_size=64), data=["calibration text ..."], tokenizer=tok)
    sm.llm.save_hf(model, "out_dir", tok)           # or save_gguf(model, "out.gguf", template="in.gguf")
"""
from smallify.llm.config import AWQ, GPTQ, RTN, DataFree, LLMWeightOnly


def __getattr__(name):          # the writers and the loader import transformers / gguf: only when used
    lazy = {"save_hf": "smallify.llm.export_hf", "save_gguf": "smallify.llm.export_gguf",
            "read_gguf_weights": "smallify.llm.export_gguf", "load_causal_lm": "smallify.llm.load",
            "calibration_windows": "smallify.llm.text", "default_texts": "smallify.llm.text"}
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module 'smallify.llm' has no attribute {name!r}")


__all__ = [
    "AWQ",
    "GPTQ",
    "RTN",
    "DataFree",
    "LLMWeightOnly",
    "calibration_windows",
    "default_texts",
    "load_causal_lm",
    "read_gguf_weights",
    "save_gguf",
    "save_hf",
]
