"""Export: torch → FP ONNX with the module → node → weight map (DESIGN.md, Contracts: Names)."""
