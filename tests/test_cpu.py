"""ONNX Runtime's integer kernels are exact on every x86-64 CPU (denoq.cpu, denoq.engines.ort.session_options).

Without VNNI, ORT's u8×s8 kernels add pairs of u8·s8 products in saturating 16-bit lanes. The graph here is built
to overflow them: u8 activations of 255 against s8 weights of 127, every pair 2·255·127 = 64770 > 32767. With
denoq's session options the result is exact on this CPU, whatever it is; where tools/cpu_as.py can imitate an AVX2
CPU without VNNI, the same graph is run there too, once with ORT's default kernels (they must saturate: the input
does overflow) and once with denoq's options (they must not).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh
from onnx.reference import ReferenceEvaluator

from denoq.cpu import SATURATES, cpu_record, isa_level
from denoq.engines.ort import PAIR_SAFE_WEIGHT, create_session, session_options, weights_fit_pair_sums

K, N = 64, 8
EXACT = 255 * 127 * K  # every output of the all-255 input against all-127 weights
TOOLS = Path(__file__).resolve().parents[1] / "tools"


def overflowing_matmul(weight: int = 127) -> onnx.ModelProto:
    """x → Q(u8) → DQ → MatMul(DQ(int8 weights of `weight`)): ORT fuses it into MatMulIntegerToFloat (u8×s8)."""
    graph = oh.make_graph(
        [oh.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
         oh.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
         oh.make_node("DequantizeLinear", ["w", "ws"], ["wd"]),
         oh.make_node("MatMul", ["xd", "wd"], ["y"])], "overflow",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "zp"),
         numpy_helper.from_array(np.full((K, N), weight, np.int8), "w"),
         numpy_helper.from_array(np.array(1.0, np.float32), "ws")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])


def run(exact_integers: bool) -> np.ndarray:
    session = ort.InferenceSession(overflowing_matmul().SerializeToString(),
                                   session_options(1, exact_integers=exact_integers),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.full((4, K), 255.0, np.float32)})[0]


def test_the_graph_is_built_to_overflow_16_bit_pair_sums():
    expected = ReferenceEvaluator(overflowing_matmul()).run(None, {"x": np.full((4, K), 255.0, np.float32)})[0]
    assert np.all(expected == EXACT) and 2 * 255 * 127 > 2**15 - 1


def test_integer_kernels_are_exact_on_this_cpu():
    assert np.all(run(exact_integers=True) == EXACT), cpu_record()


def run_file(path: Path, weight: int) -> np.ndarray:
    """The graph with weights `weight`, saved to `path` and run through denoq's own `create_session`."""
    onnx.save(overflowing_matmul(weight), str(path))
    return create_session(path, threads=1).run(None, {"x": np.full((4, K), 255.0, np.float32)})[0]


def test_seven_bit_weights_fit_the_pair_sums():
    """|q| ≤ 64 (7-bit weights) cannot saturate: 2·255·64 ≤ 32767; such graphs need no slower exact kernels."""
    assert weights_fit_pair_sums(overflowing_matmul(PAIR_SAFE_WEIGHT))
    assert not weights_fit_pair_sums(overflowing_matmul(PAIR_SAFE_WEIGHT + 1))
    assert 2 * 255 * PAIR_SAFE_WEIGHT <= 2**15 - 1 < 2 * 255 * (PAIR_SAFE_WEIGHT + 1)


def test_isa_level_is_one_ort_knows():
    assert isa_level() in SATURATES or not isa_level().startswith("x86")
    assert set(cpu_record()) == {"model", "isa", "u8s8_saturates"}


def _cpu_as():
    spec = importlib.util.spec_from_file_location("denoq_tools_cpu_as", TOOLS / "cpu_as.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHILD = """
import json, sys, tempfile
from pathlib import Path
from test_cpu import run, run_file
from denoq.cpu import isa_level
folder = Path(tempfile.mkdtemp())
print(json.dumps({"isa": isa_level(), "default": run(False).tolist(), "denoq": run(True).tolist(),
                  "file127": run_file(folder / "w127.onnx", 127).tolist(),
                  "file64": run_file(folder / "w64.onnx", 64).tolist()}))
"""


@pytest.mark.parametrize("level", ["avx2", "avx512bw"])
def test_saturation_without_vnni_and_the_remedy(level):
    """On an imitated CPU without VNNI, ORT's default kernels saturate this graph and denoq's sessions do not."""
    cpu_as = _cpu_as()
    why = cpu_as.unavailable()
    if why is not None:
        pytest.skip(f"cannot imitate a CPU without VNNI here: {why}")
    env = cpu_as.masked_env(level)
    env["PYTHONPATH"] = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=False,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["isa"] == level
    assert np.all(np.array(got["denoq"]) == EXACT)
    assert np.all(np.array(got["default"]) < 0.6 * EXACT)  # 32 saturated pairs of 32767 each: about half
    assert np.all(np.array(got["file127"]) == EXACT)  # create_session sets the exact kernels for 8-bit weights
    assert np.all(np.array(got["file64"]) == 255 * 64 * K)  # and 7-bit weights are exact without them
