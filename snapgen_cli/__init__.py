"""snapgen: reproduce SnapGen (efficient UNet + tiny decoder, multi-level KD, step distillation)."""

__version__ = "0.1.0"
