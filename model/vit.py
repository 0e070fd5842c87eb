"""timm's ViT, built locally (never a hub download), plus loading a local checkpoint into it and its preprocessing
defaults. Pure: no argparse, no files except the checkpoint that `load_pretrained` is explicitly given."""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from timm.models import load_state_dict

_log = logging.getLogger(__name__)

# timm's ImageNet defaults, for a model name that has no registered pretrained config.
_FALLBACK_DEFAULTS = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": 0.875,
                      "interpolation": "bicubic"}


class CheckpointMismatch(ValueError):
    """A checkpoint whose tensors do not fit the model beyond its classifier head; the message lists them."""


def build_model(name: str = "vit_base_patch32_224", num_classes: int = 1000, img_size: int = 224,
                pretrained: str | None = None, drop_path: float = 0.0, **kw) -> torch.nn.Module:
    """A timm model with random init, or with weights from the local checkpoint `pretrained`. `kw` goes to
    timm.create_model (e.g. depth=2, embed_dim=64 for a test-sized ViT)."""
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size,
                              drop_path_rate=drop_path, **kw)
    if pretrained:
        load_pretrained(model, pretrained)
    return model


def model_defaults(name: str) -> dict:
    """mean / std / crop_pct / interpolation of `name`'s default pretrained config (a local table, no download)."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return dict(_FALLBACK_DEFAULTS)
    return {"mean": tuple(cfg.mean), "std": tuple(cfg.std), "crop_pct": cfg.crop_pct,
            "interpolation": cfg.interpolation}


def load_pretrained(model: torch.nn.Module, path: str) -> list[str]:
    """Load the weights at `path` (a timm/torch state dict, safetensors, or our checkpoint's "model" entry; DDP
    `module.` and torch.compile `_orig_mod.` prefixes are stripped) into `model`. A classifier head of another class
    count keeps its fresh init; returns those keys. Any other missing, unexpected or misshapen tensor raises."""
    # timm's loader picks "state_dict"/"model" out of a training checkpoint and strips wrapper prefixes; EMA weights
    # are not preferred because we never write any and a foreign checkpoint's EMA is a choice the user should make.
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        state = load_state_dict(path, use_ema=False)
    except Exception as e:  # noqa: BLE001 - a file torch/safetensors cannot read, whatever the reason
        raise CheckpointMismatch(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    own = model.state_dict()
    head = _head_prefix(model)
    reinit = sorted(k for k, v in state.items()
                    if k.startswith(head) and k in own and v.shape != own[k].shape)
    for k in reinit:
        del state[k]
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state) - set(reinit))
    unexpected = sorted(set(state) - set(own))
    if bad or missing or unexpected:
        raise CheckpointMismatch(
            f"{path} does not fit {type(model).__name__}: "
            + "; ".join(filter(None, [f"shape mismatch {bad[:4]}" if bad else "",
                                      f"missing {missing[:4]}" if missing else "",
                                      f"unexpected {unexpected[:4]}" if unexpected else ""]))
            + " (another model name, --img-size or patch size?)")
    model.load_state_dict(state, strict=False)
    if reinit:
        _log.info("%s: classifier head has another class count; re-initialised %s", path, ", ".join(reinit))
    return reinit


def _head_prefix(model: torch.nn.Module) -> str:
    # timm names each model's classifier in its pretrained config ("head" for ViT).
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier", "head")
    return classifier[0] if isinstance(classifier, (list, tuple)) else classifier
