"""Calibrators: PyTorch-side statistics and rounding that produce a QuantPlan (DESIGN.md, Flow)."""
