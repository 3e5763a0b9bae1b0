"""The model families: one package each (``o1``, ``i1``)."""
