"""trainlib/devices.py: torch.compile's backend per device kind: inductor on cuda and the CPU, TorchAir's on an NPU,
or one line saying what is missing. No NPU here: a stand-in `torchair` module in sys.modules records its calls."""
from __future__ import annotations

import sys
import types

import pytest

from trainlib import devices
from trainlib.devices import Device, DeviceError, compile_backend


def stand_in_torchair(calls: list) -> types.ModuleType:
    """TorchAir's documented surface: CompilerConfig() and get_npu_backend(*, compiler_config, ...)."""
    module = types.ModuleType("torchair")

    class CompilerConfig:
        pass

    def get_npu_backend(*, compiler_config=None, custom_decompositions=None):
        calls.append(compiler_config)
        return f"npu backend #{len(calls)}"

    module.CompilerConfig, module.get_npu_backend = CompilerConfig, get_npu_backend
    return module


def test_npu_compiles_with_torchairs_backend(monkeypatch):
    calls = []
    torchair = stand_in_torchair(calls)
    monkeypatch.setitem(sys.modules, "torchair", torchair)
    assert compile_backend("npu") == "npu backend #1"
    assert len(calls) == 1 and isinstance(calls[0], torchair.CompilerConfig)  # a config passed, by keyword


@pytest.mark.parametrize("kind", ["cuda", "cpu"])
def test_cuda_and_cpu_keep_inductor(monkeypatch, kind):
    calls = []
    monkeypatch.setitem(sys.modules, "torchair", stand_in_torchair(calls))
    assert compile_backend(kind) == "inductor" and calls == []


def test_npu_without_torchair_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchair", None)  # `import torchair` raises ImportError
    with pytest.raises(DeviceError) as caught:
        compile_backend("npu")
    message = str(caught.value)
    assert "\n" not in message, message
    assert "--compile" in message and "TorchAir" in message and "torch_npu" in message, message
    assert "drop --compile" in message


def test_npu_with_a_torchair_that_fails_at_first_use_is_one_line(monkeypatch):
    """torch_npu's bundled TorchAir is a lazy module: the import works and the first attribute raises torch_npu's
    own (multi-line) error."""
    class Lazy(types.ModuleType):
        def __getattr__(self, name):
            raise RuntimeError("\nAn error occurred when import `torchair` and the above is the specific error.\n"
                               "Please check the error message above.")

    monkeypatch.setitem(sys.modules, "torchair", Lazy("torchair"))
    with pytest.raises(DeviceError) as caught:
        compile_backend("npu")
    message = str(caught.value)
    assert "\n" not in message and "An error occurred when import `torchair`" in message, message


def test_a_device_asks_for_its_backend_once(monkeypatch):
    asked = []
    monkeypatch.setattr(devices, "compile_backend", lambda kind: asked.append(kind) or "inductor")
    cpu = Device("cpu")
    assert cpu.compile_backend() == cpu.compile_backend() == "inductor"
    assert asked == ["cpu"]  # train.py's check at start and build_trainer's compile share one answer
