"""Measurements: size on disk, latency (side by side, interleaved), accuracy."""
from smallify.measure.latency import LatencyStats, bench_interleaved, openvino_runner, ort_runner, torch_runner
from smallify.measure.machine import cpu_info, cpu_summary
from smallify.measure.macs import count_macs, count_params
from smallify.measure.perplexity import perplexity
from smallify.measure.size import file_size, format_bytes

__all__ = ["LatencyStats", "bench_interleaved", "openvino_runner", "ort_runner", "torch_runner", "file_size", "format_bytes", "count_macs",
           "count_params", "cpu_info", "cpu_summary", "perplexity"]
