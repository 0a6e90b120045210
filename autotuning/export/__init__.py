"""Exports of a trained run. One module per format; each verifies what it wrote before keeping it."""

from .torch import PARITY_TOLERANCE, export_torch, max_logit_diff

__all__ = ["export_torch", "max_logit_diff", "PARITY_TOLERANCE"]
