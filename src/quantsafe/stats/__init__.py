"""Statistics used across the study. Each submodule's public names are re-exported here."""

from quantsafe.stats.agreement import accuracy, cohen_kappa, krippendorff_alpha_nominal, majority_label

__all__ = [
    "accuracy",
    "cohen_kappa",
    "krippendorff_alpha_nominal",
    "majority_label",
]
