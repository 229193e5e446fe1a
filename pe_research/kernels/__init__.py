"""Attention kernels written in Pallas (``pallas_attention.py``), behind ``model.attention``."""
