"""Experiment code behind ``sam-optax compare``: models, datasets, training, reports.

Kept apart from the optimizer core: ``sam_optax`` itself never imports this
package (it needs flax, scikit-learn, matplotlib, tqdm and orbax, the
``experiments`` extra).
"""
