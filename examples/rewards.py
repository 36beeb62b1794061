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
