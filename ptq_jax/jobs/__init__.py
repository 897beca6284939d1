"""The command line's jobs (``run.py``), apart from the library: each job module loads
its inputs as a config says, calls the library, evaluates, and writes results files
and figures. :mod:`ptq_jax.jobs.registry` maps ``config.job`` to them."""
