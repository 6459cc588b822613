"""Weight-only quantization of Hugging Face causal LMs (RTN, DataFree, GPTQ, AWQ), their calibration text,
perplexity, and the files their runtimes load (Hugging Face folders, GGUF)."""
from smallify.llm.config import AWQ, GPTQ, RTN, DataFree, LLMWeightOnly

__all__ = ["AWQ", "GPTQ", "RTN", "DataFree", "LLMWeightOnly"]
