"""Kubeflow Pipelines components: thin shells around dad_core calls."""
