"""quantsafe: what does quantizing an LLM do to its safety and trustworthiness?"""

__version__ = "0.1.0"
