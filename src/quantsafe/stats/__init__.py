"""Statistics used across the study. Each submodule's public names are re-exported here."""

from quantsafe.stats.agreement import accuracy, cohen_kappa, krippendorff_alpha_nominal, majority_label
from quantsafe.stats.means import mean_interval, paired_wilcoxon
from quantsafe.stats.proportions import PairedTest, mcnemar_exact, wilson_interval

__all__ = [
    "PairedTest",
    "accuracy",
    "cohen_kappa",
    "krippendorff_alpha_nominal",
    "majority_label",
    "mcnemar_exact",
    "mean_interval",
    "paired_wilcoxon",
    "wilson_interval",
]
