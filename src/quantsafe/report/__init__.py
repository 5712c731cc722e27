"""Scores and the Markdown/CSV report."""

from quantsafe.report.markdown import render_report, scores_csv
from quantsafe.report.scores import ALL, ScoreRow, compute_scores

__all__ = ["ALL", "ScoreRow", "compute_scores", "render_report", "scores_csv"]
