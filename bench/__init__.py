"""Side-by-side benchmarks: the product's path against the reference's plain formulation, in one run.

Each script (``generation``, ``training``, ``vqgan``) has ``main(argv) -> int`` and runs as
``python bench/<name>.py`` or ``python -m bench.<name>``; ``run_all`` runs the three. See ``docs/benchmarks.md``.
"""
