"""Distillation from a frozen teacher (see ``dinov2.distill.meta_arch``)."""
