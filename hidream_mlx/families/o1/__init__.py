"""HiDream-O1-Image: a Qwen3-VL transformer predicting 32 px pixel patches, from prompt to image (``family.py``)."""
