"""The device layer: everything that differs between CUDA GPUs, Ascend NPUs and the CPU sits here, so the training loop
calls `dev.autocast(...)`, `dev.synchronize()`, ... and never branches on the device kind. On the CPU most of these are
do-nothing calls."""
from __future__ import annotations

import contextlib
import importlib

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Dense bf16/fp16 tensor peak per chip, FLOP/s, from the vendors' data sheets; used for MFU only. A name not matched
# here gets no MFU figure rather than a made-up one. Order matters: the first substring found in the device name wins.
PEAK_FLOPS_16BIT = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


class DeviceError(RuntimeError):
    """A device asked for that this machine or install cannot provide; the message says what is missing."""


class Device:
    """One accelerator kind (`cuda`, `npu`) or the CPU, bound to one index once `set_device` ran."""

    def __init__(self, kind: str):
        self.kind = kind
        self.index: int | None = None
        self._mod = getattr(torch, kind) if kind != "cpu" else None  # torch.cuda / torch.npu (after torch_npu)
        self._compile_backend = None

    @property
    def device(self) -> torch.device:
        return torch.device(self.kind, self.index) if self.index is not None else torch.device(self.kind)

    @property
    def dist_backend(self) -> str:
        return {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}[self.kind]

    def count(self) -> int:
        return self._mod.device_count() if self._mod else 1

    def set_device(self, index: int) -> None:
        if self._mod is None:
            return
        if not 0 <= index < self.count():
            raise DeviceError(f"{self.kind}:{index} asked for, but this machine has {self.count()} {self.kind} devices")
        self.index = index
        self._mod.set_device(index)

    def name(self) -> str:
        if self._mod is None:
            return "cpu"
        return self._mod.get_device_name(self.index or 0)

    def supports_bf16(self) -> bool:
        if self._mod is None:
            return False  # CPU autocast to bf16 works, but is slower than fp32 on most CPUs (no AMX)
        if self.kind == "cuda":
            # torch counts emulated bf16 (pre-Ampere) as supported by default; there fp16 + loss scaling is faster.
            return bool(self._mod.is_bf16_supported(including_emulation=False))
        return bool(self._mod.is_bf16_supported())

    def amp_dtype(self, mode: str) -> torch.dtype:
        """--amp MODE on this device: auto = bf16 where the accelerator has it, else fp16 (with loss scaling); fp32
        on the CPU."""
        if mode != "auto":
            return AMP_DTYPES[mode]
        if self._mod is None:
            return torch.float32
        return torch.bfloat16 if self.supports_bf16() else torch.float16

    def autocast(self, dtype: torch.dtype):
        """Mixed precision context for the forward pass; a do-nothing context for fp32."""
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.kind, dtype=dtype)

    def grad_scaler(self, enabled: bool) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling; a disabled scaler passes every call straight through. torch_npu registers
        # the npu kernels torch.amp.GradScaler uses, so one class serves all kinds.
        return torch.amp.GradScaler(self.kind, enabled=enabled)

    def synchronize(self) -> None:
        if self._mod is not None:
            self._mod.synchronize()

    def max_memory_allocated(self) -> int:
        return self._mod.max_memory_allocated() if self._mod else 0

    def reset_peak_memory(self) -> None:
        if self._mod is not None:
            self._mod.reset_peak_memory_stats()

    def peak_flops(self, dtype: torch.dtype) -> float | None:
        """The chip's dense peak for `dtype`, or None where unknown (MFU is then omitted)."""
        if self._mod is None or dtype not in (torch.bfloat16, torch.float16):
            return None
        name = self.name()
        return next((peak for key, peak in PEAK_FLOPS_16BIT if key in name), None)

    def compile_backend(self):
        """torch.compile's backend here (`compile_backend`), made once: train.py asks before anything is written, so
        that a missing TorchAir is one line at start."""
        if self._compile_backend is None:
            self._compile_backend = compile_backend(self.kind)
        return self._compile_backend

    def manual_seed(self, seed: int) -> None:
        if self._mod is not None:
            self._mod.manual_seed(seed)

    def rng_state(self) -> torch.Tensor | None:
        return self._mod.get_rng_state() if self._mod else None

    def set_rng_state(self, state: torch.Tensor | None) -> None:
        if self._mod is not None and state is not None:
            self._mod.set_rng_state(state)


def compile_backend(kind: str):
    """torch.compile's backend on a device kind: "inductor" (torch's default) on cuda and the CPU. Inductor does not
    run on an Ascend NPU (torch_npu's own inductor needs Triton-Ascend): there it is TorchAir's graph backend, the one
    Ascend documents for torch.compile, with its default CompilerConfig. A DeviceError in one line when TorchAir
    cannot be loaded."""
    if kind != "npu":
        return "inductor"
    try:
        # torch_npu (imported by resolve_device first, as TorchAir requires) puts its bundled TorchAir in sys.modules
        # as a lazy module, which raises its own import failure at the first attribute: both are caught here.
        torchair = importlib.import_module("torchair")
        get_npu_backend, compiler_config = torchair.get_npu_backend, torchair.CompilerConfig
    except Exception as e:  # noqa: BLE001 - ImportError, or what torch_npu's lazy torchair replays; named below
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DeviceError(f"--compile on npu needs TorchAir, which ships inside torch_npu (no package of its own); "
                          f"it did not load here ({cause}): install a torch_npu that includes it, or drop "
                          f"--compile") from None
    return get_npu_backend(compiler_config=compiler_config())


def _npu_available() -> bool:
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return False
    return torch.npu.is_available()


def resolve_device(name: str) -> Device:
    """`name`: auto | gpu | cuda | npu | cpu (the seed's --device names, plus cuda and auto)."""
    if name == "auto":
        if torch.cuda.is_available():
            return Device("cuda")
        return Device("npu") if _npu_available() else Device("cpu")
    if name in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA GPU is visible to this torch {torch.__version__} "
                              f"(built for CUDA {torch.version.cuda}); use --device cpu or check the driver")
        return Device("cuda")
    if name == "npu":
        try:
            importlib.import_module("torch_npu")  # registers torch.npu and the 'npu' device type
        except ImportError:
            raise DeviceError("--device npu needs torch_npu (Ascend's PyTorch adapter, matching this torch "
                              f"{torch.__version__}) and the CANN toolkit; neither import worked here") from None
        if not torch.npu.is_available():
            raise DeviceError("--device npu: torch_npu is installed but sees no NPU; check the driver and "
                              "ASCEND_RT_VISIBLE_DEVICES")
        return Device("npu")
    if name == "cpu":
        return Device("cpu")
    raise DeviceError(f"--device must be one of auto, gpu, cuda, npu, cpu; got {name!r}")
