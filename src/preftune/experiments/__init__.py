"""Experiments built from the commands below them: the offline Shakespeare demo (``demo``) and the
reward-vs-KL frontier (``frontier``)."""
