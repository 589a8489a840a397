"""Importers of Hugging Face / diffusers checkpoints into lvd models (see docs/methods.md,
'Pretrained weights')."""
