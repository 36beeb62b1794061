"""Human pairwise labels: a SQLite store, a small web app, agreement statistics and export.

Typical use: ``preftune annotate serve --pairs pairs.jsonl --db annotations.sqlite``, people label in
the browser, then ``preftune annotate export --db annotations.sqlite --output prefs.jsonl`` writes
preference data for ``preftune train reward``. Other code reads labels with
``AnnotationStore(path).labels()``.
"""

from preftune.data.annotations import AnnotationStore, Assignment, Label, Pair, Progress

__all__ = ["AnnotationStore", "Assignment", "Label", "Pair", "Progress"]
