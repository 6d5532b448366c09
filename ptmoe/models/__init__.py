"""The code that travels to the Hub: configs, modeling files and the shared MoE blocks (`moe.py` and the
sibling modules it re-exports). Flat on purpose: `save_pretrained` copies the relative imports into checkpoints.
"""
