"""A vLLM engine in a process of its own, driven by JSON commands on its stdin and answering
one line ``PREFIX {json}`` each on its stdout: the plumbing that the demo's engines
(:mod:`kvbm.lab.demo_engine`) and the tests' prefill/decode driver share.

The engine process keeps the stdout it started with for answers alone and sends everything
else written to stdout (vLLM's logs, prints) to stderr: a pipe full of logs that nobody
reads would block it.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO


def prepare(work: Path, name: str, spec: dict[str, Any]) -> tuple[Path, dict[str, str]]:
    """Write ``spec`` to ``work/NAME.json``; that path and the environment of an engine
    process whose vLLM caches, temporary files and sockets are under ``work`` (in-process
    engine core, one OpenMP thread)."""
    path = work / f"{name}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CACHE_ROOT=str(work / "vllm-cache"),
               TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"), TMPDIR=str(work),
               VLLM_RPC_BASE_PATH=str(work), OMP_NUM_THREADS="1")
    return path, env


def spawn(argv: list[str], work: Path, name: str, spec: dict[str, Any], log: Path
          ) -> subprocess.Popen[str]:
    """Start ``argv + [spec's path]`` (see :func:`prepare`) with its stderr in ``log``."""
    path, env = prepare(work, name, spec)
    err = log.open("w")
    return subprocess.Popen([*argv, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                            cwd=work, bufsize=1)


def ask(proc: Any, cmd: dict[str, Any], prefix: str, timeout: float) -> Any:
    """Send one command to a started engine and return its answer."""
    proc.stdin.write(json.dumps(cmd) + "\n")
    proc.stdin.flush()
    return answer(proc, prefix, timeout)


def answer(proc: Any, prefix: str, timeout: float) -> Any:
    """The engine's next answer; :class:`RuntimeError` if none comes within ``timeout``
    s or the process ends first (lines without ``prefix`` are skipped)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return json.loads(line.removeprefix(prefix))
    raise RuntimeError(f"the engine process gave no answer (rc {proc.poll()}); see its "
                       f"log next to its spec")


def answers(prefix: str) -> Callable[[Any], None]:
    """In the engine process: take stdout for answers alone (see the module) and return
    the function that writes one."""
    out: TextIO = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def say(obj: Any) -> None:
        out.write(prefix + json.dumps(obj) + "\n")
        out.flush()

    return say
