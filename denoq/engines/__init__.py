"""Engines: runtimes for a graph (docs/architecture.md, Layout): ORT sessions and providers, TensorRT build and run."""
