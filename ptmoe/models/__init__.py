"""The code that travels to the Hub: configs, modeling files and the shared MoE blocks (`moe.py`)."""
