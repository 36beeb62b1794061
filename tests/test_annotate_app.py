"""The annotation web app through FastAPI's TestClient: pages, answers, undo, and every error case."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from preftune.annotate.app import COOKIE, create_app
from preftune.data.annotations import AnnotationStore, Pair


@pytest.fixture
def store(tmp_path: Path) -> AnnotationStore:
    s = AnnotationStore(tmp_path / "ann.sqlite")
    s.configure(per_pair=2, seed=3)
    s.add_pairs([Pair(id=f"p{i}", prompt=f"Prompt number {i}", response_a=f"Answer A{i}",
                      response_b=f"Answer B{i}") for i in range(3)])
    return s


@pytest.fixture
def client(store: AnnotationStore) -> TestClient:
    return TestClient(create_app(store))


def snapshot(store: AnnotationStore) -> dict[str, list[tuple]]:
    """Every row of every table: an error must leave all of them as they were."""
    with store._connect() as con:
        return {t: [tuple(r) for r in con.execute(f"SELECT * FROM {t} ORDER BY 1, 2")]
                for t in ("pairs", "annotators", "assignments", "labels", "settings")}


def shown(html: str) -> dict[str, str]:
    """The hidden fields and the left/right texts of a label page."""
    fields = dict(re.findall(r'name="(annotator|pair_id|order)" value="([^"]*)"', html))
    for side in ("left", "right"):
        fields[side] = re.search(rf'id="{side}-text">([^<]*)</div>', html).group(1)
    return fields


def start(client: TestClient, name: str, group: str = "") -> str:
    res = client.post("/start", data={"name": name, "group": group})
    assert res.status_code == 200 and str(res.url).endswith(f"/label?annotator={name}")
    return res.text


def test_start_page_and_redirects(client: TestClient) -> None:
    res = client.get("/")
    assert res.status_code == 200 and "Your name" in res.text and "3 pairs are loaded" in res.text
    res = client.get("/label", follow_redirects=False)              # no name yet -> start page
    assert res.status_code == 303 and res.headers["location"] == "/"
    res = client.post("/start", data={"name": "  "})
    assert res.status_code == 422 and "no annotator name given" in res.text
    assert client.get("/healthz").text == "ok 3 pairs"


def test_label_flow_maps_sides_and_counts_progress(client: TestClient, store: AnnotationStore) -> None:
    html = start(client, "alice", "team1")
    assert client.cookies.get(COOKIE) == "alice"
    assert "0 of 3 labelled; 3 left" in html
    answers = []
    for side in ("left", "right", "tie"):
        f = shown(html)
        answers.append((f["pair_id"], side, f["order"], f["left"]))
        res = client.post("/label", data={"annotator": "alice", "pair_id": f["pair_id"], "order": f["order"],
                                          "choice": side})
        assert res.status_code == 200
        html = res.text
    assert "All done" in html and "3 of 3 labelled; 0 left" in html
    got = {lab.pair_id: lab for lab in store.labels()}
    for pid, side, order, left_text in answers:
        lab = got[pid]
        assert lab.group == "team1" and lab.left_is_a == (order == "ab")
        # the text shown on the left is response_a exactly when the order token says "ab"
        assert left_text == (lab.response_a if order == "ab" else lab.response_b)
        expected = {"left": "a" if order == "ab" else "b", "right": "b" if order == "ab" else "a"}.get(side, side)
        assert lab.choice == expected


def test_undo_shows_the_pair_again(client: TestClient, store: AnnotationStore) -> None:
    f = shown(start(client, "bob"))
    client.post("/label", data={"annotator": "bob", "pair_id": f["pair_id"], "order": f["order"], "choice": "left"})
    res = client.post("/undo", data={"annotator": "bob"})
    assert res.status_code == 200 and shown(res.text)["pair_id"] == f["pair_id"]
    assert shown(res.text)["order"] == f["order"]            # same left/right order as before
    assert store.labels() == []


def test_two_annotators_at_once(store: AnnotationStore) -> None:
    """K=2 and two annotators: each labels all 3 pairs; a third finds nothing left."""
    clients = {name: TestClient(create_app(store)) for name in ("x", "y", "z")}
    pages = {name: start(c, name) for name, c in clients.items() if name != "z"}
    for _ in range(3):
        for name in ("x", "y"):
            f = shown(pages[name])
            pages[name] = clients[name].post("/label", data={"annotator": name, "pair_id": f["pair_id"],
                                                             "order": f["order"], "choice": "tie"}).text
    assert all("All done" in p for p in pages.values())
    assert sorted((lab.annotator, lab.pair_id) for lab in store.labels()) == [
        (n, f"p{i}") for n in ("x", "y") for i in range(3)]
    assert "All done" in start(clients["z"], "z") and "0 of 0 labelled" in clients["z"].get("/done").text


def test_every_error_changes_nothing(client: TestClient, store: AnnotationStore) -> None:
    f = shown(start(client, "carol"))
    good = {"annotator": "carol", "pair_id": f["pair_id"], "order": f["order"], "choice": "left"}
    assert client.post("/label", data=good).status_code == 200
    wrong_order = "ba" if store.assignment("p1", "carol").left_is_a else "ab"
    cases = [
        (404, {**good, "pair_id": "no-such-pair"}, "no pair with id"),
        (422, {k: v for k, v in good.items() if k != "choice"}, "missing form field(s): choice"),
        (422, {k: v for k, v in good.items() if k not in ("pair_id", "order")}, "pair_id, order"),
        (422, {**good, "pair_id": "p1", "choice": "both"}, "unknown choice"),
        (422, {**good, "pair_id": "p1", "order": "zz"}, "unknown order token"),
        (422, {**good, "annotator": "   "}, "no annotator name given"),
        (400, {**good, "pair_id": "p1", "order": wrong_order}, "does not match the order shown"),
        (409, good, "already labelled pair"),
        (409, {**good, "choice": "right"}, "already labelled pair"),
    ]
    before = snapshot(store)
    for status, data, message in cases:
        res = client.post("/label", data=data)
        assert res.status_code == status, (data, res.text)
        assert message in res.text and "Nothing was changed" in res.text
        assert snapshot(store) == before, data
    # undo with nothing to undo, and an unknown pair on the label page
    other = TestClient(create_app(store))
    for res, status, message in ((other.post("/undo", data={"annotator": "dave"}), 409, "no label to undo"),
                                 (client.get("/label?pair=missing"), 404, "no pair with id")):
        assert res.status_code == status and message in res.text
    assert snapshot(store) == before


def test_label_page_escapes_text(tmp_path: Path) -> None:
    store = AnnotationStore(tmp_path / "x.sqlite")
    store.add_pairs([Pair(id="h", prompt="<b>bold?</b>", response_a="<script>alert(1)</script>",
                          response_b="a & b")])
    html = TestClient(create_app(store)).get("/label?annotator=eve").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    assert "&lt;b&gt;bold?&lt;/b&gt;" in html and "a &amp; b" in html
