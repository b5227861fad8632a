"""Export: torch → FP ONNX with the module → node → weight map (docs/architecture.md, Contracts: Names)."""
