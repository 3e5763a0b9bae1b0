"""The resident server: the model loads once; an HTTP API and a small web studio use it."""
