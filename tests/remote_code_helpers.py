"""Run Python code in a fresh interpreter that cannot import this project's own packages.

This is how the tests prove the Hub remote-code rule (DESIGN.md section 6): a folder exported by `save_pretrained`
(or by the processor / pipeline / export code) must load with `trust_remote_code=True` on a machine that has only the
installed packages, never `modeling_reavl`, `processing` or `training` from this repository.

The child interpreter

- runs with `python -I` (no PYTHONPATH, no user site, no script or working directory on `sys.path`) in a temporary
  working directory, with `PYTHONPATH` removed from its environment as well;
- starts with a `sys.meta_path` finder that raises `ImportError` for the blocked top-level names, placed before the
  editable install's finder, so even `importlib.import_module("modeling_reavl")` fails;
- is offline (`HF_HUB_OFFLINE=1`) and has its own `HF_HOME` / `HF_MODULES_CACHE` under the working directory, so
  remote code is copied into a fresh `transformers_modules` cache and nothing comes from the user's caches.

Example:

```python
>>> from tests.remote_code_helpers import run_isolated_json
>>> run_isolated_json('''
... import importlib
... try:
...     importlib.import_module("modeling_reavl")
... except ImportError as error:
...     emit(str(error))
... ''')
'modeling_reavl is blocked in this isolated interpreter'
```

The code runs as a script: `emit(value)` (defined by the prelude) records one JSON-serialisable result that
`run_isolated_json` returns; `BLOCKED_PACKAGES` is visible to it too. Pass data in through files (safetensors,
JSON) in `cwd` or through `env`, not by formatting tensors into the source.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any


BLOCKED_PACKAGES = ("modeling_reavl", "processing", "training")
RESULT_FILE_VARIABLE = "REAVL_ISOLATED_RESULT"

_PRELUDE = '''\
import json as _json
import os as _os
import sys as _sys

BLOCKED_PACKAGES = {blocked!r}


class _BlockProjectPackages:
    """Refuse the project's own packages, as on a machine that only has the installed dependencies."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED_PACKAGES:
            raise ImportError(f"{{fullname}} is blocked in this isolated interpreter", name=fullname)
        return None


_sys.meta_path.insert(0, _BlockProjectPackages())


def emit(value):
    """Record the JSON-serialisable result of this run (read back by run_isolated_json)."""
    with open(_os.environ["{result_variable}"], "w", encoding="utf-8") as _handle:
        _json.dump(value, _handle)


'''


class IsolatedRunError(AssertionError):
    """The isolated interpreter exited with an error or ran past its timeout; the message carries its output."""


def _child_environment(workdir: Path, env: dict[str, str] | None) -> dict[str, str]:
    child_env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH")
    }
    child_env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HOME": str(workdir / "hf_home"),
            "HF_MODULES_CACHE": str(workdir / "hf_modules"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    child_env.update(env or {})
    return child_env


def _run(
    code: str,
    timeout: float,
    cwd: str | os.PathLike | None,
    env: dict[str, str] | None,
    blocked: tuple[str, ...],
    result_file: Path | None,
) -> str:
    with tempfile.TemporaryDirectory(prefix="reavl_isolated_") as scratch:
        workdir = Path(cwd) if cwd is not None else Path(scratch)
        script = Path(scratch) / "isolated_script.py"
        prelude = _PRELUDE.format(blocked=tuple(blocked), result_variable=RESULT_FILE_VARIABLE)
        script.write_text(prelude + textwrap.dedent(code), encoding="utf-8")
        child_env = _child_environment(workdir, env)
        child_env[RESULT_FILE_VARIABLE] = str(result_file if result_file is not None else Path(scratch) / "unused")
        try:
            completed = subprocess.run(
                [sys.executable, "-I", str(script)],
                cwd=workdir,
                env=child_env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as error:
            raise IsolatedRunError(
                f"isolated interpreter ran past {timeout} s\n--- stdout ---\n{error.stdout}\n--- stderr ---\n"
                f"{error.stderr}"
            ) from None
    if completed.returncode != 0:
        raise IsolatedRunError(
            f"isolated interpreter exited with status {completed.returncode}\n--- stdout ---\n{completed.stdout}\n"
            f"--- stderr ---\n{completed.stderr}"
        )
    return completed.stdout


def run_isolated(
    code: str,
    *,
    timeout: float = 180.0,
    cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    blocked: tuple[str, ...] = BLOCKED_PACKAGES,
) -> str:
    """Run `code` in a fresh interpreter in which `blocked` packages cannot be imported; return its stdout.

    Args:
        code: the Python source (dedented before it runs); relative paths in it resolve against `cwd`.
        timeout: seconds before the child is killed and `IsolatedRunError` is raised.
        cwd: working directory of the child (e.g. pytest's `tmp_path` holding the exported folder); a fresh
            temporary directory when `None`. The child's `HF_HOME` and `HF_MODULES_CACHE` live under it.
        env: extra environment variables for the child (override the offline / cache defaults).
        blocked: top-level package names the child cannot import.

    Raises:
        IsolatedRunError: the child exited with a non-zero status or timed out (its stdout and stderr are in the
            message, so a failing test shows the child's traceback).
    """
    return _run(code, timeout, cwd, env, blocked, result_file=None)


def run_isolated_json(
    code: str,
    *,
    timeout: float = 180.0,
    cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    blocked: tuple[str, ...] = BLOCKED_PACKAGES,
) -> Any:
    """Like [`run_isolated`], but return the value the code passed to `emit(value)` (decoded from JSON).

    Raises:
        IsolatedRunError: as `run_isolated`, or when the code never called `emit`.
    """
    with tempfile.TemporaryDirectory(prefix="reavl_isolated_result_") as result_dir:
        result_file = Path(result_dir) / "result.json"
        stdout = _run(code, timeout, cwd, env, blocked, result_file=result_file)
        if not result_file.exists():
            raise IsolatedRunError(f"the isolated code never called emit(value)\n--- stdout ---\n{stdout}")
        return json.loads(result_file.read_text(encoding="utf-8"))


__all__ = ["BLOCKED_PACKAGES", "IsolatedRunError", "run_isolated", "run_isolated_json"]
