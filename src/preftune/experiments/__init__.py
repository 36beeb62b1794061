"""Experiments built from the commands below them: the offline Shakespeare demo (``demo``), the
reward-vs-KL frontier (``frontier``) and reward-model overoptimization (``overoptimization``)."""
