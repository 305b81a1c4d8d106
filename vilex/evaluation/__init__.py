"""`vilex eval`: fidelity of image -> tokens -> image, per backend, against baselines (see evaluate.py)."""
