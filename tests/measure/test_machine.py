"""The machine line every table prints (CPU model, AMX / AVX-512 VNNI / AVX-512 BF16), and ONNX Runtime sessions
that are timed in turn with intra-op spinning off."""
import numpy as np


def test_cpu_summary_names_the_isa_that_matters():
    from smallify.measure.machine import cpu_info, cpu_summary

    text = "model name\t: AMD EPYC 9R14 96-Core Processor\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n"
    assert cpu_info(text)["isa"] == {"AMX": False, "AVX-512 VNNI": True, "AVX-512 BF16": True}
    assert cpu_summary(text).startswith("CPU: AMD EPYC 9R14 96-Core Processor, ")
    assert cpu_summary(text).endswith("; AMX no, AVX-512 VNNI yes, AVX-512 BF16 yes")
    spr = "model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    assert cpu_summary(spr).endswith("AMX yes, AVX-512 VNNI yes, AVX-512 BF16 yes")


def test_sessions_timed_in_turn_do_not_spin(tmp_path, monkeypatch):
    import onnx
    from onnx import TensorProto, helper

    import onnxruntime as ort

    from smallify.measure.latency import ort_runner

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "relu.onnx")

    entries = {}
    real = ort.SessionOptions.add_session_config_entry

    class Recording(ort.SessionOptions):
        def add_session_config_entry(self, key, value):
            entries[key] = value
            return real(self, key, value)
    monkeypatch.setattr(ort, "SessionOptions", Recording)
    run_model, inputs = ort_runner(tmp_path / "relu.onnx", 2)
    assert entries == {"session.intra_op.allow_spinning": "0"}
    assert run_model({"x": np.array([[-1.0, 0.0, 2.0, -3.0]], np.float32)}).tolist() == [[0.0, 0.0, 2.0, 0.0]]
