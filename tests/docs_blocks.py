"""The code blocks of README.md and docs/*.md, and how to run them in order (used by test_docs_blocks.py).

Every fenced block has a language. Blocks in ``bash``, ``sh``, ``shell``, ``console`` and ``python`` are
commands and run, in the order of the page, in one fresh directory per page that looks like the root of
a checkout (``examples/``, ``tests/data/`` and ``benchmarks/`` copied in), with ``.venv/bin`` first on
PATH. ``text``, ``json``, ``yaml`` and the like are shown, not run. A marker on the line right before
the opening fence changes what happens to a block:

    <!-- docs-test: output -->              shown output or an illustration: not run
    <!-- docs-test: skip (REASON) -->       not run, for the reason given (a GPU, the hub, a browser, ...)
    <!-- docs-test: slow (REASON) -->       run only when PREFTUNE_DOCS_SLOW=1 (minutes of CPU)
    <!-- docs-test: file PATH -->           not run: its text is written to PATH, for later blocks to use
    <!-- docs-test: excerpt PATH -->        not run: a quote of the checkout's PATH, checked to be in it verbatim

How each runnable block runs:

* ``bash`` / ``sh`` / ``shell``: the block is one ``bash -e -o pipefail`` script; the first command that
  fails fails the block.
* ``console``: each ``$ COMMAND`` line (with its ``\\`` continuation lines) runs; the lines after it up to
  the next ``$`` are its output as shown. The command must succeed, or fail when the shown output starts
  with ``error:``; and every shown line must appear, in order, in what the command printed (stdout and
  stderr together, whitespace ignored: a table or sentence may wrap at another width, JSON may be shown
  condensed). ``...`` stands for any text; a line in parentheses, like ``(the same table; last rows)``,
  is a comment.
* ``python``: the block is one script, run with the venv's python; each block stands alone.

Every command sees HOME, the caches and the Hugging Face directories inside the page's directory, the
hub offline, OMP_NUM_THREADS=1 (unless set) and COLUMNS=120. `preftune` and `python` reach a warm
server that has imported torch once (see "warm" below); PREFTUNE_DOCS_COLD=1 runs each in a fresh
process instead (the same results, four times slower).

By hand: ``python tests/docs_blocks.py [PAGE.md ...] [--keep DIR]`` runs pages (all by default) and
prints each block's seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COPIED = ["examples", "tests/data", "benchmarks"]   # what the docs use, relative to the checkout's root

RUNNABLE = {"bash", "sh", "shell", "console", "python"}
SHOWN = {"text", "json", "jsonl", "yaml", "csv", "markdown", "html", "diff", "toml"}
KINDS = ("output", "skip", "slow", "file", "excerpt")
SLOW_ENV = "PREFTUNE_DOCS_SLOW"

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+)(?P<info>.*)$")
MARKER = re.compile(r"^<!-- docs-test: (?P<kind>[a-z-]+)(?: (?P<arg>.*?))? -->$")
ANY_MARKER = re.compile(r"<!--\s*docs-test")


def _shown(path: Path) -> Path:
    """``path`` relative to the checkout when it is inside it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


class DocsFormatError(ValueError):
    """A page's fences or markers are malformed; the message names the file and line."""


@dataclass
class Block:
    path: Path            # the markdown file
    line: int             # 1-based line of the opening fence
    lang: str
    text: str
    kind: str = "run"     # run, output, skip, slow, file, excerpt
    arg: str = ""         # the reason (skip, slow) or the path (file, excerpt)

    @property
    def where(self) -> str:
        return f"{_shown(self.path)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.lang in RUNNABLE and self.kind in ("run", "slow")


def parse(path: Path) -> list[Block]:
    """Every fenced block of ``path`` with its marker; DocsFormatError for anything malformed."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = _shown(path)
    blocks: list[Block] = []
    marker: tuple[int, str, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = MARKER.match(line.strip())
        if m:
            kind, arg = m["kind"], (m["arg"] or "").strip()
            if kind not in KINDS:
                raise DocsFormatError(f"{rel}:{i + 1}: unknown docs-test marker {kind!r} (known: {', '.join(KINDS)})")
            if kind == "skip" and not re.fullmatch(r"\(.+\)", arg):
                raise DocsFormatError(f"{rel}:{i + 1}: 'skip' needs a reason in parentheses: "
                                      "<!-- docs-test: skip (needs a GPU) -->")
            if kind == "slow" and arg and not re.fullmatch(r"\(.+\)", arg):
                raise DocsFormatError(f"{rel}:{i + 1}: the reason of 'slow' goes in parentheses")
            if kind in ("file", "excerpt") and (not arg or " " in arg or arg.startswith("/") or ".." in arg.split("/")):
                raise DocsFormatError(f"{rel}:{i + 1}: '{kind}' needs one relative path: <!-- docs-test: {kind} judge.py -->")
            if kind == "excerpt" and not (ROOT / arg).is_file():
                raise DocsFormatError(f"{rel}:{i + 1}: 'excerpt' of {arg}, which is not a file of the checkout")
            if kind == "output" and arg:
                raise DocsFormatError(f"{rel}:{i + 1}: 'output' takes no argument")
            if i + 1 >= len(lines) or not FENCE.match(lines[i + 1]) or lines[i + 1].strip() == "```":
                raise DocsFormatError(f"{rel}:{i + 1}: a docs-test marker must be the line right before an opening fence")
            marker = (i + 1, kind, arg.strip("()") if kind in ("skip", "slow") else arg)
            i += 1
            continue
        if ANY_MARKER.search(line):
            raise DocsFormatError(f"{rel}:{i + 1}: malformed docs-test marker {line.strip()!r}; "
                                  "expected e.g. <!-- docs-test: skip (needs a GPU) -->")
        f = FENCE.match(line)
        if not f:
            i += 1
            continue
        info = f["info"].strip()
        lang = info.split()[0] if info else ""
        if not lang:
            raise DocsFormatError(f"{rel}:{i + 1}: a code block without a language; use ```bash, ```console or "
                                  "```python for commands, ```text (or json, yaml, ...) for what is only shown")
        if lang not in RUNNABLE | SHOWN:
            raise DocsFormatError(f"{rel}:{i + 1}: unknown code block language {lang!r}")
        indent, fence = f["indent"], f["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise DocsFormatError(f"{rel}:{i + 1}: the code block is never closed")
        block = Block(path, i + 1, lang, "\n".join(body) + "\n")
        if marker is not None:
            block.kind, block.arg = marker[1], marker[2]
            if block.kind in ("skip", "slow") and lang not in RUNNABLE:
                raise DocsFormatError(f"{rel}:{i}: '{block.kind}' on a ```{lang} block, which never runs")
            marker = None
        if lang == "console" and block.kind in ("run", "slow") and not block.text.lstrip().startswith("$ "):
            raise DocsFormatError(f"{rel}:{i + 1}: a ```console block starts with a `$ command` line")
        blocks.append(block)
        i = j + 1
    return blocks


# ----------------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    ran: list[str] = field(default_factory=list)        # where, seconds
    skipped: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def environment(work: Path) -> dict[str, str]:
    """The environment of every block: the venv first on PATH, nothing downloaded, caches in ``work``."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HOME": str(work / ".home"), "XDG_CACHE_HOME": str(work / ".cache"),   # ~/.cache/preftune/ref_logps too
        "PREFTUNE_CACHE": str(work / ".cache" / "preftune"), "HF_HOME": str(work / ".cache" / "huggingface"),
        "MPLBACKEND": "Agg", "COLUMNS": "120", "TERM": "dumb", "NO_COLOR": "1", "PYTHONHASHSEED": "0",
    })
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def prepare(work: Path) -> None:
    """Make ``work`` look like the root of a checkout: the folders the docs use."""
    for rel in COPIED:
        shutil.copytree(ROOT / rel, work / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _run(cmd: list[str], work: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``cmd`` in its own process group (killed whole on timeout); (exit status, stdout + stderr)."""
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -1, (out or "") + f"\n[timed out after {timeout:.0f} s]"
    return proc.returncode, out


def console_steps(text: str) -> list[tuple[str, list[str]]]:
    """``$ command`` lines (continuations joined) and the output lines shown after each."""
    steps: list[tuple[str, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("$ "):
            cmd = lines[i][2:]
            while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
            steps.append((cmd, []))
        elif steps:
            steps[-1][1].append(lines[i])
        i += 1
    return steps


def _squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


def missing_output(shown: list[str], actual: str) -> str | None:
    """The first shown line not found in ``actual``, in order, or None when every one is there.

    Whitespace is ignored (so a table or a sentence that wraps at another width, or JSON printed one
    value per line but shown condensed, still matches) and ``...`` stands for any text."""
    got = _squeeze(actual)
    pos = 0
    for line in shown:
        s = line.strip()
        if not s or s == "..." or (s.startswith("(") and s.endswith(")")):
            continue
        for part in s.split("..."):
            part = _squeeze(part)
            if not part:
                continue
            k = got.find(part, pos)
            if k < 0:
                return line
            pos = k + len(part)
    return None


def run_block(block: Block, work: Path, env: dict[str, str], *, timeout: float) -> str | None:
    """Run one block in ``work``; None when it did what the page says, else the failure (with output)."""
    def failed(what: str, out: str) -> str:
        tail = "\n".join(out.rstrip().splitlines()[-60:])
        return f"{block.where} ({block.lang}): {what}\n--- output (last 60 lines) ---\n{tail}"

    if block.lang == "python":
        script = work / f".docs_block_{block.line}.py"
        script.write_text(block.text, encoding="utf-8")
        code, out = _run([shutil.which("python", path=env["PATH"]) or sys.executable, script.name], work, env, timeout)
        return None if code == 0 else failed(f"python exited with status {code}", out)
    if block.lang in ("bash", "sh", "shell"):
        code, out = _run(["bash", "-e", "-o", "pipefail", "-c", block.text], work, env, timeout)
        return None if code == 0 else failed(f"the script exited with status {code}", out)
    for cmd, shown in console_steps(block.text):
        code, out = _run(["bash", "-o", "pipefail", "-c", cmd], work, env, timeout)
        expect_error = next((s.strip() for s in shown if s.strip()), "").startswith("error:")
        if expect_error and code == 0:
            return failed(f"`$ {cmd}` succeeded, but the page shows an error", out)
        if not expect_error and code != 0:
            return failed(f"`$ {cmd}` exited with status {code}", out)
        lost = missing_output(shown, out)
        if lost is not None:
            return failed(f"`$ {cmd}` did not print the line shown on the page:\n  {lost.strip()}", out)
    return None


# ------------------------------------------------------ warm `preftune` and `python` for the commands
#
# A page runs `preftune ...` and `python ...` dozens of times, and each fresh process spends seconds
# importing torch and transformers before it does anything. So a page's commands reach a warm server
# instead: a process that imported those once and forks a child per command, which runs the command
# (`preftune.cli.main`, or a script or module as `python` would) with the command's argv, working
# directory, environment and stdin/stdout/stderr (passed over a Unix socket). The `preftune` and
# `python` first on the blocks' PATH are shims that do this; the `python` shim takes `python FILE.py
# ...` and `python -m MODULE ...` and hands anything else (and everything, when the server is not
# there yet) to the real interpreter. PREFTUNE_DOCS_COLD=1 runs every command in a fresh process.

COLD_ENV = "PREFTUNE_DOCS_COLD"
WARM_IMPORTS = ("torch", "transformers", "accelerate", "peft", "matplotlib.pyplot", "preftune.cli",
                "preftune.cli.train", "preftune.train", "preftune.train.loop", "preftune.models.load",
                "preftune.generate", "preftune.compare", "preftune.judges", "preftune.report")
WARM_MIN_COMMANDS = 4     # the server's own imports cost about as much as three cold commands
HEAVY = re.compile(r"^(\$ )?(OMP_NUM_THREADS=\d+ )?(preftune (train|generate|compare|score|prefs loss|experiment|demo)"
                   r"|python (-m )?\S+)", re.M)


def heavy_commands(path: Path) -> int:
    """Commands and Python blocks on the page that import torch (where a warm server pays)."""
    return sum(1 if b.lang == "python" else len(HEAVY.findall(b.text)) for b in parse(path) if b.runnable)


SHIM = """#!{python} -S
# `{name}` for the docs test: ask the warm server (tests/docs_blocks.py) to run the command.
import json, os, socket, sys
args, mode = sys.argv[1:], "{name}"
if mode == "python":
    if args[:1] == ["-m"] and len(args) > 1:
        mode = "module"
    elif not args or not args[0].endswith(".py") or not os.path.isfile(args[0]):
        os.execv({real!r}, [{real!r}, *args])
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect({sock!r})
except OSError:
    os.execv({real!r}, [{real!r}, *args])
request = {{"mode": mode, "argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}}
socket.send_fds(s, [json.dumps(request).encode()], [0, 1, 2])
reply = s.recv(64)
code = int(reply) if reply else 1
sys.exit(code if code >= 0 else 128 - code)
"""


def serve(sock_path: str) -> None:
    """The warm server: import the heavy modules once, then fork a child per request."""
    import importlib

    for name in WARM_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a child imports it again and reports the error itself
            pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(sock_path + ".tmp")
    srv.listen(8)
    os.rename(sock_path + ".tmp", sock_path)        # the socket appears only once it accepts
    children: set[int] = set()

    def reap(pid: int, conn: socket.socket) -> None:
        _, status = os.waitpid(pid, 0)
        children.discard(pid)
        try:
            conn.send(str(os.waitstatus_to_exitcode(status)).encode())
        finally:
            conn.close()

    while True:
        conn, _ = srv.accept()
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        request = json.loads(msg)
        if request.get("stop"):
            for pid in list(children):
                os.kill(pid, signal.SIGKILL)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            srv.close()
            _child(request, fds)
        for fd in fds:
            os.close(fd)
        children.add(pid)
        threading.Thread(target=reap, args=(pid, conn), daemon=True).start()


def _child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the command, run it, exit with its status."""
    import runpy

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "torch" in sys.modules and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    mode, args = request["mode"], request["argv"]
    code = 1
    try:
        if mode == "preftune":
            sys.argv = ["preftune", *args]
            from preftune.cli import main

            main()
        elif mode == "module":                        # python -m MODULE ARGS: sys.path[0] is the cwd
            sys.argv, sys.path[0] = [args[1], *args[2:]], os.getcwd()
            sys.modules.pop(args[1], None)            # re-run as __main__ without runpy's warning
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:                                         # python FILE.py ARGS: sys.path[0] is its folder
            sys.argv, sys.path[0] = list(args), str(Path(args[0]).resolve().parent)
            runpy.run_path(args[0], run_name="__main__")
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - print it as the real process would
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class WarmServer:
    """Start a server (its shims go into ``bin_dir``); ``close()`` stops it. Pages can share one: every
    child takes its command's environment and directory; the server's own environment (caches, HOME)
    is a directory of its own, with the settings that modules read at import time (offline, threads)
    the same as the pages'."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="docs-warm-"))   # short: a socket path has ~100 bytes
        env = environment(self.dir)
        self.sock = str(self.dir / "preftune.sock")
        self.bin_dir = self.dir / "bin"
        self.bin_dir.mkdir()
        for name in ("preftune", "python"):
            shim = self.bin_dir / name
            real = str(Path(sys.executable).parent / name)
            shim.write_text(SHIM.format(python=sys.executable, name=name, sock=self.sock, real=real),
                            encoding="utf-8")
            shim.chmod(0o755)
        self.log = open(self.dir / "server.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", self.sock],
                                     cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 300.0) -> None:
        """Until the server accepts commands (the shims run commands cold before that)."""
        end = time.monotonic() + timeout
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the warm server did not start: {(self.dir / 'server.log').read_text()}")
            time.sleep(0.1)

    def close(self) -> None:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(self.sock)
            socket.send_fds(s, [json.dumps({"stop": True}).encode()], [])
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_page(path: Path, work: Path, *, slow: bool | None = None, timeout: float = 600.0,
             warm: WarmServer | None = None) -> Outcome:
    """Run the page's blocks in order in ``work`` (prepared here); stop at the first failure.

    ``warm``: a server shared by several pages; without one, a page that runs enough torch commands
    starts its own (unless PREFTUNE_DOCS_COLD=1)."""
    slow = os.environ.get(SLOW_ENV, "") not in ("", "0") if slow is None else slow
    prepare(work)
    env = environment(work)
    own = None
    if warm is None and not cold() and heavy_commands(path) >= WARM_MIN_COMMANDS:
        warm = own = WarmServer()
    if warm is not None:
        env["PATH"] = f"{warm.bin_dir}{os.pathsep}{env['PATH']}"
    try:
        return _run_blocks(path, work, env, slow=slow, timeout=timeout)
    finally:
        if own is not None:
            own.close()


def cold() -> bool:
    return os.environ.get(COLD_ENV, "") not in ("", "0")


def _run_blocks(path: Path, work: Path, env: dict[str, str], *, slow: bool, timeout: float) -> Outcome:
    outcome = Outcome()
    for block in parse(path):
        if block.kind == "excerpt":
            if block.text not in (ROOT / block.arg).read_text(encoding="utf-8"):
                outcome.failures.append(f"{block.where}: the block is no longer a verbatim excerpt of {block.arg}; "
                                        "copy the current text")
                break
            continue
        if block.kind == "file":
            target = work / block.arg
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.text, encoding="utf-8")
            continue
        if not block.runnable:
            continue
        if block.kind == "slow" and not slow:
            outcome.skipped.append(f"{block.where} (slow: {block.arg or 'minutes'}; set {SLOW_ENV}=1)")
            continue
        start = time.perf_counter()
        failure = run_block(block, work, env, timeout=timeout)
        outcome.ran.append(f"{block.where} {time.perf_counter() - start:.1f} s")
        if failure is not None:
            outcome.failures.append(failure)
            break
    return outcome


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str]) -> int:
    """python tests/docs_blocks.py [PAGE.md ...] [--keep DIR]: run pages by hand, print each block's time."""
    if argv[:1] == ["--serve"]:
        serve(argv[1])
        return 0
    keep = None
    if "--keep" in argv:
        k = argv.index("--keep")
        keep, argv = Path(argv[k + 1]), argv[:k] + argv[k + 2:]
    pages = [Path(a).resolve() for a in argv] or DOCS
    status = 0
    warm = None if cold() or len(pages) < 2 else WarmServer()
    try:
        status = _run_pages(pages, keep, warm)
    finally:
        if warm is not None:
            warm.close()
    return status


def _run_pages(pages: list[Path], keep: Path | None, warm: WarmServer | None) -> int:
    status = 0
    for page in pages:
        work = (keep / page.stem) if keep else Path(tempfile.mkdtemp(prefix=f"docs-{page.stem}-"))
        if work.exists() and keep:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        start, cpu = time.perf_counter(), _children_cpu()
        outcome = run_page(page, work, warm=warm)
        cpu_text = "" if warm else f", {_children_cpu() - cpu:.1f} s CPU"   # a shared server's children: not yet reaped
        print(f"== {_shown(page)}: {time.perf_counter() - start:.1f} s wall{cpu_text}, in {work}")
        for line in outcome.ran + outcome.skipped:
            print("  ", line)
        for failure in outcome.failures:
            print(failure)
            status = 1
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
