"""hogwild: online training of a served LLM, in place, on Kubernetes."""

__version__ = "0.1.0"
