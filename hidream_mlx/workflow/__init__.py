"""The explore -> re-render workflow: batches of seeds and prompts per load, and images that re-run themselves."""
