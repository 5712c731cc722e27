"""People in the loop: a sample of a study's judged answers, labelled by annotators in a small web app."""

from quantsafe.annotation.csv_io import export_labels, import_labels
from quantsafe.annotation.queue import DEFAULT_SAMPLE, annotator_order, choose_sample
from quantsafe.annotation.store import LABELS, AnnotationStore, HumanLabel, SampleItem, Unit, human_labels

__all__ = ["DEFAULT_SAMPLE", "LABELS", "AnnotationStore", "HumanLabel", "SampleItem", "Unit",
           "annotator_order", "choose_sample", "export_labels", "human_labels", "import_labels"]
