"""Small reference models and real data loaders used by the demo, the tests and the benchmarks."""
