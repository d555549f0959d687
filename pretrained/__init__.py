"""Pretrained weights (safetensors + JSON cards) and the script that trains them (``train.py``)."""
