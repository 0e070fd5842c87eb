"""Pure model code: timm's ViT built locally, checkpoint loading into it, its FLOPs, its step-speed adaptations."""
from model.flops import TRAIN_FLOPS_FACTOR, flops_per_image
from model.fp8 import fp8_supported, use_fp8
from model.fused import use_pixel_input
from model.vit import CheckpointMismatch, build_model, load_pretrained, model_defaults

__all__ = ["build_model", "load_pretrained", "model_defaults", "flops_per_image", "TRAIN_FLOPS_FACTOR",
           "CheckpointMismatch", "use_pixel_input", "use_fp8", "fp8_supported"]
