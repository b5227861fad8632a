"""The names of the sampler's eps backends (`denoq sample --backend`), apart from their heavy implementations in
`denoq.compiler.backends`, so that the command line's parser builds without importing torch."""

BACKENDS = ("torch-fp", "torch-sim", "ort", "ort-fp", "ort-fp16", "trt", "ort-cuda", "ort-trt", "onnx-ref")
#: The backends that run the quantized model (the others run the FP model).
QUANTIZED_BACKENDS = ("ort", "torch-sim", "ort-fp16", "trt", "ort-cuda", "ort-trt", "onnx-ref")
