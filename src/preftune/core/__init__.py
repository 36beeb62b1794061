"""The mathematics of preference tuning as pure functions of tensors and numbers (torch, numpy and the
standard library only): preference losses and their registry (``losses``), the Bradley-Terry and
Plackett-Luce losses of reward models (``reward_losses``), the RL pieces of online
RLHF (``rl``), log-probabilities of a batch (``logprobs``), Bradley-Terry / Plackett-Luce / MaxMin
(``prefs``) and the Bradley-Terry fit to comparisons (``bt_fit``).

Nothing here reads files, loads models or imports transformers, so every formula can be computed and
tested on its own.
"""
