"""Stress the annotation server: concurrent labels, hostile requests, kill -9 and restart; count losses.

Starts `preftune annotate serve` in a subprocess (as a user would) on a free localhost port, then runs at
the same time:

- W worker threads (default 8), each one annotator (some named in Chinese, Cyrillic, with an emoji) in
  its own cookie jar, each giving N labels (default 50) the way the page does: GET /label, read the
  pair id, order and session token, POST /label from the same origin; every 10th answer is undone and
  given again. A label counts as acknowledged when the POST answered 303. A request cut off by a kill
  is retried once the server is back (a 409 then means the first try was stored).
- H hostile threads (default 2) sending, round after round: cross-origin POSTs (Origin evil, Origin
  null, a foreign Referer) to /undo, /label and /start carrying a victim's real cookie *and* token; bad
  and missing tokens; malformed, non-form and invalid-UTF-8 bodies; 1 MB and 20 MB bodies; a
  non-numeric Content-Length; unknown pair ids; duplicate labels; bad choices, order tokens and names;
  odd query strings; a foreign Host header; unknown paths and methods.
- the main thread kills the server with SIGKILL K times (default 3: after a quarter, half and three
  quarters of the labels) while requests are in flight, and restarts it on the same port and database.

At the end it reads the database and prints: acknowledged labels missing from the database (or stored
with another answer), labels nobody acknowledged, 5xx answers (and tracebacks in the server log),
hostile requests that were not refused, and every status seen per kind of request.

    python benchmarks/annotate_stress.py                     # 8 x 50 labels, 2 hostile threads, 3 kills
    python benchmarks/annotate_stress.py --workers 4 --labels 20 --kills 1 --json

Standard library only (urllib, http.client, threading), plus preftune itself to read the database.
"""

from __future__ import annotations

import argparse
import http.client
import http.cookiejar
import json
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install

NAMES = ["李雷", "Дмитрий", "😀 ana", "ana", "Zoë", "عمر", "worker 6", "Ωmega"]
EVIL = "http://evil.example"
TOKEN_RE = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')
FIELD_RE = re.compile(r'name="(pair_id|order)" value="([^"]*)"')


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):        # a 303 is the answer we want to see
        return None


class Down(Exception):
    """The server did not answer (killed, restarting)."""


class Client:
    """One browser: its own cookies; every answer's status is counted under a kind."""

    def __init__(self, base: str, stats: Stats) -> None:
        self.base, self.stats = base, stats
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), NoRedirect)

    def request(self, kind: str, path: str, data: dict | bytes | None = None, headers: dict | None = None,
                method: str | None = None) -> tuple[int, str]:
        body = urllib.parse.urlencode(data).encode() if isinstance(data, dict) else data
        req = urllib.request.Request(self.base + path, data=body, headers=headers or {}, method=method)
        if isinstance(data, dict):
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with self.opener.open(req, timeout=60) as res:
                status, text = res.status, res.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode("utf-8", "replace")
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException, TimeoutError, OSError) as exc:
            self.stats.down(kind)
            raise Down(str(exc)) from exc
        self.stats.seen(kind, status, text)
        return status, text

    def token(self, kind: str = "page") -> str:
        status, text = self.request(kind, "/")
        return TOKEN_RE.search(text).group(1)


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_kind: dict[str, Counter] = defaultdict(Counter)
        self.server_errors: list[str] = []
        self.not_refused: list[str] = []
        self.requests = 0
        self.cut_off = Counter()
        self.closed_early = 0

    def seen(self, kind: str, status: int, text: str) -> None:
        with self.lock:
            self.requests += 1
            self.by_kind[kind][status] += 1
            if status >= 500:
                self.server_errors.append(f"{kind}: {status} {text[:200]!r}")

    def down(self, kind: str) -> None:
        with self.lock:
            self.cut_off[kind] += 1

    def expect(self, kind: str, status: int, allowed: tuple[int, ...]) -> None:
        if status not in allowed:
            with self.lock:
                self.not_refused.append(f"{kind}: got {status}, expected one of {allowed}")


class Server:
    def __init__(self, db: Path, pairs: Path, log: Path) -> None:
        self.db, self.pairs, self.log = db, pairs, log
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.up = threading.Event()

    def start(self) -> None:
        cmd = [sys.executable, "-m", "preftune", "annotate", "serve", "--db", str(self.db), "--pairs",
               str(self.pairs), "--per-pair", "0", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=2) as res:
                    if res.read().startswith(b"ok"):
                        self.up.set()
                        return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"server did not start in 60 s:\n{self.log.read_text()}")

    def kill(self) -> None:
        self.up.clear()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def wait_up(self) -> None:
        if not self.up.wait(timeout=120):
            raise SystemExit("the server stayed down for 120 s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def retrying(server: Server, fn):
    """Call fn until the server answers (it may be down for a restart)."""
    for _ in range(200):
        try:
            return fn()
        except Down:
            time.sleep(0.2)
            server.wait_up()
    raise SystemExit("gave up after 200 tries")


# --- workers -------------------------------------------------------------------------------------

def worker(server: Server, stats: Stats, name: str, n_labels: int, acked: dict, lock: threading.Lock,
           seed: int) -> None:
    rng = random.Random(seed)
    c = Client(server.base, stats)
    origin = {"Origin": server.base}
    token = retrying(server, c.token)
    status, _ = retrying(server, lambda: c.request("start", "/start", {"name": name, "csrf_token": token}, origin))
    assert status == 303, status
    done = 0
    while done < n_labels:
        url = f"/label?annotator={urllib.parse.quote(name)}"
        status, html = retrying(server, lambda url=url: c.request("label page", url))
        fields = dict(FIELD_RE.findall(html))
        if status != 200 or "pair_id" not in fields:
            raise SystemExit(f"{name}: no pair to label after {done} labels ({status})")
        token = TOKEN_RE.search(html).group(1)
        side = rng.choice(["left", "right", "tie", "skip"])
        form = {"annotator": name, "pair_id": fields["pair_id"], "order": fields["order"], "choice": side,
                "csrf_token": token}
        status = post_label(server, c, form)
        choice = {"left": "a" if fields["order"] == "ab" else "b",
                  "right": "b" if fields["order"] == "ab" else "a"}.get(side, side)
        with lock:
            acked[(name, fields["pair_id"])] = choice
        done += 1
        if done % 10 == 0:                              # undo the last answer and give it again
            try:
                status, text = c.request("undo", "/undo", {"annotator": name, "csrf_token": token}, origin)
                if status != 303:
                    raise SystemExit(f"{name}: undo answered {status}: {text[:300]}")
                undone = True
            except Down:
                server.wait_up()
                undone = None                           # unknown: the answer below settles it
            with lock:
                acked.pop((name, fields["pair_id"]), None)
            post_label(server, c, form, after_undo=undone is None)
            with lock:
                acked[(name, fields["pair_id"])] = choice


def post_label(server: Server, c: Client, form: dict, after_undo: bool = False) -> int:
    """POST a label until the server answers 303 (stored now) or, on a retry, 409 (stored by a cut-off try)."""
    retry = after_undo
    while True:
        try:
            status, text = c.request("label", "/label", form, {"Origin": server.base})
        except Down:
            server.wait_up()
            retry = True
            continue
        if status == 303 or (retry and status == 409):
            return status
        raise SystemExit(f"label answered {status}: {text[:300]}")


# --- hostile requests ------------------------------------------------------------------------------

def hostile(server: Server, stats: Stats, stop: threading.Event, victim_name: str, seed: int) -> None:
    """Rounds of bad requests; the victim's session (cookie + real token) is used for the cross-site ones."""
    rng = random.Random(seed)
    while not stop.is_set():
        try:
            one_round(server, stats, victim_name, rng)
        except Down:
            server.wait_up()


def one_round(server: Server, stats: Stats, victim_name: str, rng: random.Random) -> None:
    victim = Client(server.base, stats)
    token = victim.token("hostile setup")
    q = urllib.parse.quote(victim_name)
    _, html = victim.request("hostile setup", f"/label?annotator={q}")
    fields = dict(FIELD_RE.findall(html))
    same = {"Origin": server.base}
    label = {"annotator": victim_name, "pair_id": fields.get("pair_id", "p0"), "order": fields.get("order", "ab"),
             "choice": "left"}
    forbidden = (403,)
    for url, data in (("/undo", {"annotator": victim_name}), ("/label", label), ("/start", {"name": "mallory"})):
        for headers in ({"Origin": EVIL}, {"Origin": "null"}, {"Referer": EVIL + "/page.html"},
                        {"Origin": "http://[::1"}, {"Referer": server.base + ":99999/"},
                        {"Origin": server.base.replace("127.0.0.1", "localhost")}):
            stats.expect("cross-origin", victim.request("cross-origin", url, {**data, "csrf_token": token},
                                                        headers)[0], forbidden)
        for tok in (None, "", "0" * 64, token[:-1] + ("0" if token[-1] != "0" else "1"), "é" * 64, token * 50):
            form = data if tok is None else {**data, "csrf_token": tok}
            stats.expect("bad token", victim.request("bad token", url, form, same)[0], forbidden)
        stranger = Client(server.base, stats)
        stats.expect("no session cookie", stranger.request("no session cookie", url, {**data, "csrf_token": token},
                                                           same)[0], forbidden)
    ok_token = {**same, "X-CSRF-Token": token}
    malformed = [
        (b"--x\r\nContent-Disposition: form-data\r\n\r\nbroken", "multipart/form-data; boundary=x"),
        (b"garbage", "multipart/form-data"),
        (b'{"annotator": "x"}', "application/json"),
        (b"annotator=%ff%fe&pair_id=%00&order=ab&choice=left", "application/x-www-form-urlencoded"),
        (b"annotator=\xff\xfe&pair_id=\x00&order=ab&choice=left", "application/x-www-form-urlencoded"),
        (b"&&&===&", "application/x-www-form-urlencoded"),
        (bytes(rng.randrange(256) for _ in range(2000)), "application/octet-stream"),
    ]
    for body, ctype in malformed:
        status, _ = victim.request("malformed", "/label", body, {**ok_token, "Content-Type": ctype})
        stats.expect("malformed", status, (400, 404, 422))
    for size in (1 << 20, 12 << 20, 40 << 20):
        try:
            status, _ = victim.request("huge", "/label", b"a=" + b"x" * size,
                                       {**ok_token, "Content-Type": "application/x-www-form-urlencoded"})
            stats.expect("huge", status, (413,))
        except Down:                    # past 16 MiB the server answers 413 without reading on and closes,
            if not server.up.is_set() or size <= 16 << 20:   # so the sender may see the connection reset
                raise
            with stats.lock:
                stats.closed_early += 1
    raw_request(server, stats, "bad content-length",
                b"POST /label HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n", (400,))
    raw_request(server, stats, "foreign host", b"GET / HTTP/1.1\r\nHost: rebound.evil.example\r\n\r\n", (400,))
    checks = [
        ("unknown pair", {**label, "pair_id": f"nope-{rng.random()}"}, (404,)),
        ("bad choice", {**label, "choice": "both"}, (422,)),
        ("bad order", {**label, "order": "zz"}, (422,)),
        ("bad name", {**label, "annotator": "x" * 65}, (422,)),
        ("bad name", {**label, "annotator": "tab\there"}, (422,)),
        ("bad name", {**label, "annotator": "   "}, (422,)),
        ("missing fields", {"annotator": victim_name}, (422,)),
    ]
    for kind, form, allowed in checks:
        stats.expect(kind, victim.request(kind, "/label", {**form, "csrf_token": token}, same)[0], allowed)
    # unicode names: a new person in every script, label once, then the duplicate is refused
    name = rng.choice(["李雷", "Дмитрий", "😀 ana", "ελένη", "श्रुति"]) + f" {rng.randrange(10**6)}"
    status, _ = victim.request("unicode name", "/start", {"name": name, "csrf_token": token}, same)
    stats.expect("unicode name", status, (303,))
    status, html = victim.request("unicode name", f"/label?annotator={urllib.parse.quote(name)}")
    f = dict(FIELD_RE.findall(html))
    if "pair_id" in f:
        form = {"annotator": name, "pair_id": f["pair_id"], "order": f["order"], "choice": "tie", "csrf_token": token}
        stats.expect("unicode name", victim.request("unicode name", "/label", form, same)[0], (303,))
        stats.expect("duplicate", victim.request("duplicate", "/label", form, same)[0], (409,))
        wrong = {**form, "order": "ba" if f["order"] == "ab" else "ab", "pair_id": f["pair_id"]}
        stats.expect("duplicate", victim.request("duplicate", "/label", wrong, same)[0], (400, 409))
        stats.expect("undo", victim.request("undo", "/undo", {"annotator": name, "csrf_token": token}, same)[0],
                     (303,))
    for path in ("/label?annotator=%ff%fe", "/label?annotator=%00", "/label?annotator=" + "x" * 5000,
                 "/label?pair=%ED%A0%80&annotator=z", "/done?annotator=%C0%80", "/static/../app.py",
                 "/nowhere", "/?" + "a=" * 3000):
        stats.expect("odd GET", victim.request("odd GET", path)[0], (200, 303, 404, 422))
    stats.expect("wrong method", victim.request("wrong method", "/label", method="PUT")[0], (405,))
    stats.expect("wrong method", victim.request("wrong method", "/healthz", b"x", method="POST")[0], (405,))


def raw_request(server: Server, stats: Stats, kind: str, raw: bytes, allowed: tuple[int, ...]) -> None:
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(raw)
            head = s.recv(4096).split(b"\r\n", 1)[0]
    except OSError as exc:
        stats.down(kind)
        raise Down(str(exc)) from exc
    if not head:
        stats.down(kind)
        raise Down("no answer")
    status = int(head.split()[1])
    stats.seen(kind, status, head.decode("latin-1"))
    stats.expect(kind, status, allowed)


# --- main ----------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--labels", type=int, default=50, help="labels per worker")
    ap.add_argument("--hostile", type=int, default=2, help="hostile threads")
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs of the server while requests are in flight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()

    from preftune.data.annotations import AnnotationStore

    tmp = Path(tempfile.mkdtemp(prefix="annotate-stress-"))
    pairs, db, log = tmp / "pairs.jsonl", tmp / "annotations.sqlite", tmp / "server.log"
    n_pairs = args.labels + 10
    pairs.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Prompt {i}: say something.",
                                         "response_a": f"Answer A to {i}", "response_b": f"Answer B to {i}"}) + "\n"
                             for i in range(n_pairs)), encoding="utf-8")
    server = Server(db, pairs, log)
    server.start()
    stats, acked, lock = Stats(), {}, threading.Lock()
    names = [NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f" {i}") for i in range(args.workers)]
    victim = "victim ☂"
    vc = Client(server.base, stats)                     # the victim labels a few pairs first
    vt = vc.token()
    vc.request("start", "/start", {"name": victim, "csrf_token": vt}, {"Origin": server.base})
    for _ in range(3):
        _, html = vc.request("label page", f"/label?annotator={urllib.parse.quote(victim)}")
        f = dict(FIELD_RE.findall(html))
        post_label(server, vc, {"annotator": victim, "pair_id": f["pair_id"], "order": f["order"], "choice": "tie",
                                "csrf_token": vt})
        acked[(victim, f["pair_id"])] = "tie"

    t0 = time.monotonic()
    stop = threading.Event()
    errors: list[BaseException] = []

    def run(fn, *a):
        try:
            fn(*a)
        except BaseException as exc:                    # noqa: BLE001 -- reported below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(worker, server, stats, name, args.labels, acked, lock,
                                                  args.seed + i)) for i, name in enumerate(names)]
    hostiles = [threading.Thread(target=run, args=(hostile, server, stats, stop, victim, args.seed + 100 + i))
                for i in range(args.hostile)]
    for t in workers + hostiles:
        t.start()
    rng = random.Random(args.seed)
    kills, total = 0, args.workers * args.labels
    marks = [(k + 1) / (args.kills + 1) * total for k in range(args.kills)]     # kill at 25%, 50%, 75% ...
    while kills < args.kills and any(t.is_alive() for t in workers):
        time.sleep(0.05)
        if len(acked) - 3 < marks[kills]:
            continue
        time.sleep(rng.uniform(0.0, 0.2))
        server.kill()
        kills += 1
        time.sleep(rng.uniform(0.0, 0.5))
        server.start()
    for t in workers:
        t.join()
    stop.set()
    for t in hostiles:
        t.join()
    seconds = time.monotonic() - t0
    server.kill()

    stored = {(lab.annotator, lab.pair_id): lab.choice for lab in AnnotationStore(db, create=False).labels()}
    lost = sorted(k for k, v in acked.items() if stored.get(k) != v)
    hostile_names = {k for k in stored if k[0] not in set(names) | {victim}}
    unacked = sorted(k for k in stored if k not in acked and k not in hostile_names)
    tracebacks = log.read_text(errors="replace").count("Traceback")
    figures = {
        "workers": args.workers, "labels_per_worker": args.labels, "hostile_threads": args.hostile,
        "kills": kills, "seconds": round(seconds, 1), "requests_answered": stats.requests,
        "requests_cut_off": dict(stats.cut_off),
        "bodies_over_16MiB_refused_by_closing": stats.closed_early,
        "labels_acknowledged": len(acked), "labels_in_db": len(stored),
        "acknowledged_labels_lost": len(lost), "labels_stored_unacknowledged": len(unacked),
        "answers_5xx": len(stats.server_errors), "server_tracebacks": tracebacks,
        "hostile_requests_not_refused": len(stats.not_refused),
        "thread_errors": [repr(e) for e in errors],
        "statuses": {k: dict(sorted(v.items())) for k, v in sorted(stats.by_kind.items())},
    }
    if args.json:
        print(json.dumps(figures, indent=2, ensure_ascii=False))
    else:
        for key, value in figures.items():
            if key != "statuses":
                print(f"{key:32} {value}")
        print("statuses per kind of request:")
        for kind, counts in figures["statuses"].items():
            print(f"  {kind:24} {counts}")
    for line in (stats.server_errors + stats.not_refused)[:20]:
        print("  !", line)
    for k in lost[:20]:
        print(f"  ! lost {k}: acknowledged {acked[k]!r}, stored {stored.get(k)!r}")
    print(f"server log: {log}")
    bad = lost or unacked or stats.server_errors or tracebacks or stats.not_refused or errors
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
