"""The annotation web app through FastAPI's TestClient: pages, answers, undo, and every error case."""

from __future__ import annotations

import re
from html import unescape as html_unescape
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from preftune.annotate.app import COOKIE, create_app
from preftune.annotate.security import SESSION_COOKIE, loopback_hosts
from preftune.data.annotations import AnnotationStore, Pair
from preftune.errors import PreftuneError


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


def form_token(client: TestClient) -> str:
    """The session token the pages give this client (the first page sets the session cookie)."""
    return re.search(r'name="csrf_token" value="([0-9a-f]+)"', client.get("/").text).group(1)


def post(client: TestClient, url: str, data: dict[str, str], **kwargs) -> object:
    """POST a form as the page would: with this client's session token."""
    return client.post(url, data={**data, "csrf_token": form_token(client)}, **kwargs)


def start(client: TestClient, name: str, group: str = "") -> str:
    res = post(client, "/start", {"name": name, "group": group})
    assert res.status_code == 200 and str(res.url).endswith(f"/label?annotator={quote(name)}")
    return res.text


def test_start_page_and_redirects(client: TestClient) -> None:
    res = client.get("/")
    assert res.status_code == 200 and "Your name" in res.text and "3 pairs are loaded" in res.text
    res = client.get("/label", follow_redirects=False)              # no name yet -> start page
    assert res.status_code == 303 and res.headers["location"] == "/"
    res = post(client, "/start", {"name": "  "})
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
        res = post(client, "/label", {"annotator": "alice", "pair_id": f["pair_id"], "order": f["order"],
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
    post(client, "/label", {"annotator": "bob", "pair_id": f["pair_id"], "order": f["order"], "choice": "left"})
    res = post(client, "/undo", {"annotator": "bob"})
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
            pages[name] = post(clients[name], "/label", {"annotator": name, "pair_id": f["pair_id"],
                                                         "order": f["order"], "choice": "tie"}).text
    assert all("All done" in p for p in pages.values())
    assert sorted((lab.annotator, lab.pair_id) for lab in store.labels()) == [
        (n, f"p{i}") for n in ("x", "y") for i in range(3)]
    assert "All done" in start(clients["z"], "z") and "0 of 0 labelled" in clients["z"].get("/done").text


def test_every_error_changes_nothing(client: TestClient, store: AnnotationStore) -> None:
    f = shown(start(client, "carol"))
    good = {"annotator": "carol", "pair_id": f["pair_id"], "order": f["order"], "choice": "left"}
    assert post(client, "/label", good).status_code == 200
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
        res = post(client, "/label", data)
        assert res.status_code == status, (data, res.text)
        assert message in res.text and "Nothing was changed" in res.text
        assert snapshot(store) == before, data
    # undo with nothing to undo, and an unknown pair on the label page
    other = TestClient(create_app(store))
    for res, status, message in ((post(other, "/undo", {"annotator": "dave"}), 409, "no label to undo"),
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


# --- cross-site requests (issue 11) -------------------------------------------------------------

def test_cross_site_posts_are_refused_and_change_nothing(client: TestClient, store: AnnotationStore) -> None:
    """A page on another site cannot label, undo or register for a person whose browser is logged in:
    the Origin (or Referer) check alone stops it (the attacker is even given the right token here), and
    so does the token alone (right origin, no token, a wrong one, or one from another session)."""
    f = shown(start(client, "victim"))
    assert post(client, "/label", {"annotator": "victim", "pair_id": f["pair_id"], "order": f["order"],
                                   "choice": "left"}).status_code == 200
    html = client.get("/label").text
    nxt, token = shown(html), re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    label = {"annotator": "victim", "pair_id": nxt["pair_id"], "order": nxt["order"], "choice": "right"}
    requests = [("/undo", {"annotator": "victim"}), ("/label", label), ("/start", {"name": "mallory"})]
    stranger = TestClient(create_app(store))
    other_token = form_token(stranger)                              # valid, but for another session
    before = snapshot(store)
    for url, data in requests:
        for headers, tok, why in (
            ({"Origin": "http://evil.example"}, token, "another site"),
            ({"Origin": "http://testserver.evil.example"}, token, "another site"),
            ({"Origin": "http://testserver:8080"}, token, "another site"),      # another port: another origin
            ({"Origin": "null"}, token, "another site"),
            ({"Referer": "http://evil.example/attack.html"}, token, "another site"),
            ({"Origin": "http://[::1"}, token, "another site"),                 # unparsable: refused, not 500
            ({"Referer": "http://testserver:99999/x"}, token, "another site"),
            ({"Origin": "http://testserver"}, None, "session token is missing"),
            ({"Origin": "http://testserver"}, "0" * 64, "does not match"),
            ({"Origin": "http://testserver"}, other_token, "does not match"),
            ({"Origin": "http://testserver"}, "é" * 64, "does not match"),      # not ASCII: 403, not 500
            ({}, None, "session token is missing"),
        ):
            form = data if tok is None else {**data, "csrf_token": tok}
            res = client.post(url, data=form, headers=headers)
            assert res.status_code == 403, (url, headers, tok, res.text)
            assert why in res.text and "Nothing was changed" in res.text
            assert snapshot(store) == before, (url, headers)
    # without the session cookie the right token is refused too (a cross-site request may lack it)
    bare = TestClient(create_app(store))
    assert bare.post("/undo", data={"annotator": "victim", "csrf_token": token}).status_code == 403
    assert snapshot(store) == before
    # the same requests from the page itself work: same origin (or referer), token from the page
    res = client.post("/label", data={**label, "csrf_token": token}, headers={"Origin": "http://testserver"})
    assert res.status_code == 200 and len(store.labels()) == 2
    res = client.post("/undo", data={"annotator": "victim"}, headers={
        "Referer": "http://testserver/label?annotator=victim", "X-CSRF-Token": token})
    assert res.status_code == 200 and len(store.labels()) == 1


def test_allow_origin_for_a_proxy(store: AnnotationStore) -> None:
    client = TestClient(create_app(store, allow_origins=["https://Label.Example.org/"]))
    token = form_token(client)
    ok = client.post("/undo", data={"annotator": "nobody", "csrf_token": token},
                     headers={"Origin": "https://label.example.org"})
    assert ok.status_code == 409                                # passed the checks: nothing to undo
    for origin in ("http://label.example.org", "https://label.example.org:8443", "https://evil.example"):
        res = client.post("/undo", data={"annotator": "nobody", "csrf_token": token}, headers={"Origin": origin})
        assert res.status_code == 403, origin
    for bad in ("label.example.org", "https://label.example.org/path", "ftp://x", "https://x:port"):
        with pytest.raises(PreftuneError, match="is not an origin"):
            create_app(store, allow_origins=[bad])


def test_loopback_server_refuses_other_host_names(store: AnnotationStore) -> None:
    """Served on 127.0.0.1, a request whose Host is another name (a DNS-rebinding page) gets 400."""
    hosts = loopback_hosts("127.0.0.1", ["https://label.example.org"])
    assert loopback_hosts("0.0.0.0") is None                   # on a network: any name the server has
    app = create_app(store, hosts=hosts)
    for base in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000", "http://label.example.org"):
        assert TestClient(app, base_url=base).get("/healthz").status_code == 200, base
    res = TestClient(app, base_url="http://rebound.evil.example:8000").get("/")
    assert res.status_code == 400 and "does not answer to the Host" in res.text


def test_oversized_and_malformed_bodies_get_4xx(client: TestClient, store: AnnotationStore) -> None:
    token = form_token(client)
    before = snapshot(store)
    res = client.post("/label", data={"annotator": "x", "pair_id": "p" * 100_000, "order": "ab",
                                      "choice": "left", "csrf_token": token})
    assert res.status_code == 413 and "over 65,536 bytes" in res.text
    res = client.post("/label", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"})
    assert 400 <= res.status_code < 500
    res = client.post("/label", json={"annotator": "x"}, headers={"X-CSRF-Token": token})
    assert res.status_code == 422 and "missing form field(s)" in res.text
    assert snapshot(store) == before


# --- names in every script (issue 11) -----------------------------------------------------------

@pytest.mark.parametrize("name", ["李雷", "Дмитрий", "😀 ana", "Zoë; a=b, \"q\" %41"])
def test_names_in_every_script(store: AnnotationStore, name: str) -> None:
    """Start, label (by form field and by cookie), undo, come back: no 500, the name round-trips."""
    client = TestClient(create_app(store), raise_server_exceptions=False)
    html = start(client, name)
    assert client.cookies.get(COOKIE) == quote(name, safe="")          # ASCII on the wire
    f = shown(html)
    assert html_unescape(f["annotator"]) == name
    res = post(client, "/label", {"annotator": name, "pair_id": f["pair_id"], "order": f["order"], "choice": "left"})
    assert res.status_code == 200 and [lab.annotator for lab in store.labels()] == [name]
    res = post(client, "/label", {"annotator": name, "pair_id": f["pair_id"], "order": f["order"], "choice": "left"})
    assert res.status_code == 409                                        # a retry: already labelled, not 500
    page = client.get("/label")                                          # who am I: from the cookie
    assert page.status_code == 200 and "1 of 3 labelled" in page.text
    assert html_unescape(shown(page.text)["annotator"]) == name
    res = post(client, "/undo", {})                                     # no form field: the cookie says who
    assert res.status_code == 200 and store.labels() == []
    assert client.get(f"/label?annotator={quote(name)}").status_code == 200      # the personal link


def test_label_is_not_stored_when_the_answer_cannot_be_built(store: AnnotationStore,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The redirect (with its cookie) is built before the label is stored, so a failure there cannot
    leave a stored label behind a 500 (whose retry would then get 409)."""
    from starlette.responses import Response

    client = TestClient(create_app(store), raise_server_exceptions=False)
    f = shown(start(client, "frank"))
    data = {"annotator": "frank", "pair_id": f["pair_id"], "order": f["order"], "choice": "left"}
    token = form_token(client)

    def broken(self, *args, **kwargs):
        raise RuntimeError("cannot set the cookie")

    monkeypatch.setattr(Response, "set_cookie", broken)
    assert client.post("/label", data={**data, "csrf_token": token}).status_code == 500
    assert store.labels() == []
    monkeypatch.undo()
    assert client.post("/label", data={**data, "csrf_token": token}).status_code == 200
    assert len(store.labels()) == 1


def test_session_token_survives_a_restart(store: AnnotationStore) -> None:
    """The signing secret is kept in the database: a page loaded before a restart still works after it."""
    client = TestClient(create_app(store))
    f = shown(start(client, "gina"))
    token = form_token(client)
    restarted = TestClient(create_app(AnnotationStore(store.path)), cookies=dict(client.cookies))
    res = restarted.post("/label", data={"annotator": "gina", "pair_id": f["pair_id"], "order": f["order"],
                                         "choice": "tie", "csrf_token": token})
    assert res.status_code == 200 and len(store.labels()) == 1
    assert client.cookies.get(SESSION_COOKIE) and token not in client.cookies.get(SESSION_COOKIE)
