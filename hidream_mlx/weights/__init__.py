"""Model families on the shared engine: ``o1`` (HiDream-O1-Image) and ``i1`` (HiDream-I1)."""
