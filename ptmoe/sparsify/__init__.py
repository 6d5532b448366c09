"""Sparse inference from a dense model: split its FFNs into experts, fit routers, recover by distillation.

    dense BERT / T5 ──► ptmoe.upcycle(method="partition", partition="coactivation", num_shared_neurons=S,
                                      combine_weights="ones", calibration=texts)       split (ptmoe/upcycling/experts.py)
                    ──► ptmoe.fit_routers(model, texts)      routers predict each expert's activation mass
                    ──► ptmoe.distill(model, dense, texts)   layer-wise + output distillation (ptmoe/compress)
                    ──► ptmoe.sparsify.sparsify(...) / `ptmoe sparsify` do all three (and save)

The split strategies live with the other expert initialisations in `ptmoe/upcycling/experts.py`; reading the text,
the tokenizer and the dense FFN activations live on the floor below (`ptmoe.calibration`); this package holds router
fitting and the one-call pipeline.
"""

from .pipeline import active_ffn_share, agreement_with_dense, sparsify
from .routers import expert_activation_mass, fit_routers

__all__ = [
    "active_ffn_share",
    "agreement_with_dense",
    "sparsify",
    "expert_activation_mass",
    "fit_routers",
]
