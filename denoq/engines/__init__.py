"""Engines: runtimes for a graph (DESIGN.md, Layout): ORT sessions and providers, TensorRT build and run."""
