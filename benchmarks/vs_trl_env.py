"""The TRL environment of ``vs_trl.py``: TRL installed beside preftune, never as its dependency.

A venv (``.venv-trl`` by default) whose ``_preftune_site.pth`` puts preftune's site-packages after its own,
and ``pip install trl==TRL_VERSION`` with a constraints file pinning the packages both tools share to the
versions preftune runs, so pip installs only TRL and both tools run the same torch and transformers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

TRL_VERSION = "1.16.0"
SHARED_PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "datasets")


def shared_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in SHARED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def ensure_trl_env(path: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """The TRL environment at ``path``: a venv whose ``.pth`` puts preftune's site-packages after its own,
    so TRL is installed over the same torch / transformers / accelerate (pinned by a constraints file to
    the versions here, so pip installs only what is missing); created when absent or not right."""
    python = path / "bin" / "python"
    probe = ("import json, torch, transformers, accelerate, trl; print(json.dumps({'trl': trl.__version__, "
             "'torch': torch.__version__, 'transformers': transformers.__version__, "
             "'accelerate': accelerate.__version__, 'torch_file': torch.__file__}))")
    mine = shared_versions()

    def check() -> dict[str, Any] | None:
        if not python.exists():
            return None
        done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
        if done.returncode != 0:
            return None
        found = json.loads(done.stdout.strip().splitlines()[-1])
        same = all(found[k] == mine.get(k) for k in ("torch", "transformers", "accelerate"))
        return found if found["trl"] == TRL_VERSION and same else None

    found = check()
    if found:
        return found
    progress(f"creating the TRL environment in {path} (trl=={TRL_VERSION} over preftune's torch/transformers)")
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_preftune_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    constraints = path / "constraints.txt"
    constraints.write_text("".join(f"{k}=={v}\n" for k, v in mine.items()), encoding="utf-8")
    log = path / "pip-install.log"
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-c",
                               str(constraints), f"trl=={TRL_VERSION}"], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"pip install trl=={TRL_VERSION} failed; see {log}")
    found = check()
    if not found:
        raise SystemExit(f"the TRL environment in {path} does not import trl {TRL_VERSION} over torch "
                         f"{mine.get('torch')} / transformers {mine.get('transformers')}; see {log}")
    progress(f"TRL environment ready: {found}")
    return found
