"""Kill-and-resume harness (tests/test_kill_resume.py): runs `shearkit` commands in child processes
that count events and SIGKILL themselves at a chosen one.

Events, in the order a run meets them: every decoder block's forward call (calibration, blockwise
loops, trials, training, evaluation), every backward pass (`Tensor.backward`, which accelerate's
`backward` calls too) and every `os.replace` (the rename that ends each atomic write), counted
once before the rename and once after it. A run is a function of its command and seed, so the
same command meets the same events; `kill_at=k` makes the child send itself SIGKILL at event k
(a real kill: no exception, no cleanup, no atexit), after writing the event's label to
`<events>.killed`. An uninterrupted run writes its list of event labels to `events` at exit, from
which a test picks the window of a stage and a seeded point in it.

Two ways to start a child, the same code in it (`_child`: install the hooks, then run
`shearkit.cli` as `python -m shearkit.cli` does):
- `fresh_run(...)`: a new interpreter, `python tests/killpoint.py child SPEC`;
- `Zygote`: one interpreter that imported torch, transformers, peft and shearkit once, and forks
  a child per command (`python tests/killpoint.py serve`): the same process tree and kill, without
  ten seconds of imports per command. It never runs a tensor operation itself, so forking it is safe.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def child_env(extra: dict | None = None) -> dict:
    """The children's environment: one thread (the tests' setting; every run of a case alike)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    env.update(extra or {})
    return env


# -- inside a child ---------------------------------------------------------------------------------

def _install(kill_at: int | None, events_out: str | None) -> list[str]:
    import torch

    events: list[str] = []
    killed_file = f"{events_out}.killed" if events_out else None

    def event(label: str) -> None:
        events.append(label)
        if kill_at is not None and len(events) >= kill_at:
            if killed_file:
                Path(killed_file).write_text(json.dumps({"index": len(events), "label": label}))
            os.kill(os.getpid(), signal.SIGKILL)

    def block_hook(module, args):
        name = type(module).__name__
        if name.endswith("DecoderLayer") or name == "GPT2Block":
            event(f"forward:{name}")

    torch.nn.modules.module.register_module_forward_pre_hook(block_hook)
    backward = torch.Tensor.backward

    def counted_backward(self, *a, **k):
        event("backward")
        return backward(self, *a, **k)

    torch.Tensor.backward = counted_backward
    replace = os.replace
    cwd = os.getcwd()

    def counted_replace(src, dst, *a, **k):
        rel = os.path.relpath(os.fspath(dst), cwd)
        event(f"replace-before:{rel}")
        out = replace(src, dst, *a, **k)
        event(f"replace-after:{rel}")
        return out

    os.replace = counted_replace
    return events


def _child(spec: dict) -> int:
    """Run one command as `python -m shearkit.cli ARGV` would, with the event hooks; returns its exit code."""
    import runpy
    import traceback

    os.chdir(spec["cwd"])
    events = _install(spec.get("kill_at"), spec.get("events"))
    sys.argv = ["shearkit", *spec["argv"]]
    code = 0
    try:
        runpy.run_module("shearkit.cli", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported through the exit code and stderr
        traceback.print_exc()
        code = 1
    if spec.get("events"):
        Path(spec["events"]).write_text(json.dumps(events))
    return code


def _redirect(spec: dict) -> None:
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(spec[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)


def _serve() -> None:
    """The zygote: import once, then fork a child per request line (JSON spec) read from stdin."""
    import importlib

    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import shearkit.api  # noqa: F401
    import shearkit.cli  # noqa: F401
    import shearkit.pipeline  # noqa: F401
    import shearkit.recovery  # noqa: F401
    from shearkit.methods import METHODS

    for info in METHODS.values():
        importlib.import_module(info.module)
    out = sys.stdout
    for line in sys.stdin:
        spec = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: its own stdout/stderr, the command, then exit without the parent's cleanup
            code = 1
            try:
                _redirect(spec)
                code = _child(spec)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out.write(json.dumps({"pid": pid, "returncode": code}) + "\n")
        out.flush()


# -- in the test process ----------------------------------------------------------------------------

def _spec(argv, cwd, log_dir: Path, tag: str, kill_at: int | None, events: Path | None) -> dict:
    log_dir.mkdir(parents=True, exist_ok=True)
    return {"argv": [str(a) for a in argv], "cwd": str(cwd), "kill_at": kill_at,
            "events": None if events is None else str(events),
            "stdout": str(log_dir / f"{tag}.out"), "stderr": str(log_dir / f"{tag}.err")}


class Zygote:
    """A preloaded interpreter that forks one child per command (see the module docstring)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=child_env())

    def run(self, argv, *, cwd, log_dir: Path, tag: str, kill_at: int | None = None,
            events: Path | None = None) -> int:
        spec = _spec(argv, cwd, log_dir, tag, kill_at, events)
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote died (exit {self.proc.wait()})")
        return json.loads(line)["returncode"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fresh_run(argv, *, cwd, log_dir: Path, tag: str, kill_at: int | None = None, events: Path | None = None) -> int:
    """The same command in a new interpreter (`python tests/killpoint.py child SPEC`)."""
    spec = _spec(argv, cwd, log_dir, tag, kill_at, events)
    with open(spec["stdout"], "w") as o, open(spec["stderr"], "w") as e:
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), "child", json.dumps(spec)],
                              stdout=o, stderr=e, env=child_env()).returncode


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        _serve()
    elif sys.argv[1] == "child":
        sys.exit(_child(json.loads(sys.argv[2])))
    else:
        sys.exit(f"usage: {sys.argv[0]} serve | child SPEC")
