"""HiDream-E1: instruction editing on the HiDream-I1 engine (E1.1 and E1-Full); ``E1Family`` is in ``../family.py``."""
