"""Calibrators: PyTorch-side statistics and rounding that produce a QuantPlan (docs/architecture.md, Flow)."""
