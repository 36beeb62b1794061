"""Toy ground-truth rewards for the online examples and the frontier experiment on the tiny model.

A reward function takes (prompt, completion) and returns a float; point a config at one with
``reward: examples/rewards.py:letters`` (or ``reward: my_package.my_module:my_function``).
"""


def letters(prompt: str, completion: str) -> float:
    """The share of the completion's characters that are ASCII letters: 1.0 at best (letters only), 0.0
    for an empty completion. The random tiny model writes about half letters, half other bytes."""
    if not completion:
        return 0.0
    return sum(c.isascii() and c.isalpha() for c in completion) / len(completion)


def spaces(prompt: str, completion: str) -> float:
    """The share of the completion's characters that are spaces (0.0 for an empty completion): a second
    group's taste that pulls against ``letters`` (a space is not a letter), for ``rewards:`` with
    ``reward_aggregation: maxmin`` (examples/maxmin.yaml). The random tiny model writes few spaces."""
    if not completion:
        return 0.0
    return completion.count(" ") / len(completion)


def letters_and_o(prompt: str, completion: str) -> float:
    """An imperfect proxy of ``letters_few_o`` for the overoptimization experiment (examples/overoptimization.yaml):
    the share of letters plus 0.05 per letter ``o``, as if a reward model had learned that good answers contain
    an ``o``. It keeps rising as the policy writes more ``o``s."""
    return letters(prompt, completion) + 0.05 * completion.count("o")


def letters_few_o(prompt: str, completion: str) -> float:
    """The ground truth behind ``letters_and_o``: the share of letters, minus 0.25 per ``o`` beyond two. A policy
    that optimises the proxy first gains letters (both rewards rise), then piles up ``o``s (only the proxy rises)."""
    return letters(prompt, completion) - 0.25 * max(0, completion.count("o") - 2)
