"""Self-contained HTML reports of smallify's results."""
from smallify.html.report import load_result, render, write_report

__all__ = ["load_result", "render", "write_report"]
