"""The first hour of a new user (issue 34): README.md's commands and the demo's closing block work as printed.

A fresh copy of the repository (the files ``git`` would clone, plus ``.venv``) runs ``make demo``, then every
command of README.md's ``bash`` blocks (parsed from the file now, in the order printed), then every command the
demo printed under "Where to look". Each runs in a subprocess from the copy's root, with nothing activated and
without the test suite's offline variables (the CLI must set them itself), and must end with its documented exit
code, no ``Traceback``, no ``ERROR`` line and no telemetry message. Servers (``serve-api``, ``mlflow ui``,
``mlflow models serve``) are started, probed over HTTP (and the README's ``curl`` against them), then stopped.

What differs from a user's clone, and why (kept small):

- the copy's ``params.yaml`` carries ``TINY_SIZES`` (image and dataset sizes, epochs, ``serve.port``, the stream's
  idle timeout): the commands are the printed ones, they just train on 64-pixel images, in seconds;
- after the demo, the commands use the test session's Prefect server (``PREFECT_API_URL``) instead of starting a
  temporary one each (the demo itself runs as a user's would: no Prefect variable, history in ``runs/.prefect``);
- ``PLACEHOLDERS``: the README's stand-ins for the user's own files become files of the demo;
- ``SKIPPED``, ``DEMO_SKIPPED``: commands that are not run here, each with its reason.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from components.config import config_to_dict, load_config
from flows.cli import OFFLINE_ENV
from tests.conftest import REPO_ROOT
from tests.test_pipeline_helpers import TINY_OVERRIDES, shared_prefect_api

README = REPO_ROOT / "README.md"
DEMO_OUT = "runs/demo"
NEW_PRODUCTS = "runs/new_products"  # the README's path/to/new_product: a synthetic product the demo has not learned
NO_VENV_REBUILD = "make -o .venv/.contad-installed "  # the copy's .venv links to the suite's own: never reinstall it from the copy
# Commands not run here, matched by their start, with the reason.
SKIPPED = {
    "make demo": "run once, first, by the `fresh` fixture (every other command works on its outputs)",
    "make test": "the test suite itself (this test is part of it)",
    "make repro": "dvc repro of the whole pipeline: tests/test_dvc_pipeline.py runs it (tiny params), issue 34's clean-clone check at full size",
}
# Lines of the demo's closing block not run here, by label, with the reason.
DEMO_SKIPPED = {
    "demo: add a product": "the same add-product onto the demo's store and registry as README's 'A new product arrives' "
    "block, which runs it (the most expensive line: a training step and an evaluation of every product)",
}
SERVERS = ("serve-api", "mlflow ui", "mlflow models serve")  # long-running: start, probe, stop
SERVER_START_S = 180.0
COMMAND_TIMEOUT_S = 300
TELEMETRY = re.compile(r"telemetry", re.IGNORECASE)
ERROR_LINE = re.compile(r"\bERROR\b")


@dataclass(frozen=True)
class Command:
    """One shell command as printed: where it was found (README section or the demo's block) and its text."""

    where: str
    text: str


def readme_commands(markdown: str) -> list[Command]:
    """Every command of ``markdown``'s ```bash blocks, in order: ``\\`` continuations joined, comment lines dropped."""
    commands: list[Command] = []
    section = "README"
    in_block = False
    pending = ""
    for line in markdown.splitlines():
        if not in_block and line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.strip().startswith("```"):
            in_block = not in_block and line.strip() == "```bash"
            continue
        if not in_block:
            continue
        text = pending + line.strip()
        if text.endswith("\\"):
            pending = text[:-1].rstrip() + " "
            continue
        pending = ""
        if text and not text.startswith("#"):
            commands.append(Command(section, text))
    return commands


def closing_commands(demo_stdout: str) -> list[Command]:
    """The commands of the demo's closing block: ``  label:  COMMAND   (note)`` lines after "Where to look:"."""
    block = demo_stdout.split("Where to look:", 1)[1]
    commands = []
    for line in block.splitlines():
        label, _, value = line.partition(":")
        value = value.strip().split("   (", 1)[0]  # a trailing "   (docs: URL)" is a note, not part of the command
        program = Path(value.split()[0]).name if value else ""  # (not shlex: a reason may hold an apostrophe)
        if program in ("contad", "mlflow"):
            commands.append(Command(f"demo: {label.strip()}", value))
    return commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_sizes(port: int) -> list[str]:
    """The copy's params.yaml overrides: sizes and durations only (see the module docstring)."""
    return [*TINY_OVERRIDES, "data.synth.products=2", f"serve.port={port}", "stream.idle_timeout_s=2", "stream.checkpoint_every=4"]


def _copy_repository(dest: Path) -> None:
    """The files a clone of this working tree has (tracked and not ignored), and ``.venv`` as a link."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT, capture_output=True, check=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / ".venv").symlink_to(REPO_ROOT / ".venv")
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)  # a clone is a git repository (dvc needs one)


def user_env(home: Path) -> dict[str, str]:
    """A new user's shell: nothing activated, none of the suite's offline or Prefect variables, a fresh HOME."""
    venv_bin = str(REPO_ROOT / ".venv" / "bin")
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV and not k.startswith(("PREFECT_", "MLFLOW_", "PYTEST"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env["HOME"] = str(home)
    env.pop("VIRTUAL_ENV", None)
    return env


@dataclass
class Fresh:
    """The fresh copy after ``make demo``: its root, the user's environment, the demo's output, the service port."""

    root: Path
    env: dict[str, str]
    demo_stdout: str
    port: int
    products: list[str]
    new_product: str  # a product folder the demo has not learned (runs/new_products/NAME)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Fresh:
    """A fresh copy of the repository with tiny params, after ``make demo`` run as a user would."""
    if not (REPO_ROOT / ".venv" / "bin" / "contad").is_file():
        pytest.skip(".venv/bin/contad missing: run `make venv`")
    root = tmp_path_factory.mktemp("fresh") / "contad"
    root.mkdir()
    _copy_repository(root)
    port = _free_port()
    cfg = load_config(REPO_ROOT / "params.yaml", tiny_sizes(port))
    (root / "params.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    env = user_env(root.parent / "home")
    # `make demo` as printed; -o: never rebuild the shared .venv from the copy (it is a link to the suite's own)
    done = subprocess.run(shlex.split(NO_VENV_REBUILD) + ["demo"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)
    _check(Command("Quick start", "make demo"), done.returncode, done.stdout + done.stderr, 0)
    assert (root / "runs" / ".prefect" / "prefect.db").is_file(), "Prefect history belongs in the project's runs/.prefect"
    assert not (root.parent / "home" / ".prefect").exists(), "nothing written to the user's global ~/.prefect"
    products = sorted(p.name for p in (root / DEMO_OUT / "data").iterdir() if p.is_dir() and not p.name.startswith("."))
    made = subprocess.run([".venv/bin/contad", "data", "synth", "--out", NEW_PRODUCTS, "--products", str(len(products) + 1)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    new = min(p.name for p in (root / NEW_PRODUCTS).iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in products)
    return Fresh(root, env, done.stdout, port, products, f"{NEW_PRODUCTS}/{new}")


def _check(command: Command, rc: int | None, output: str, expected: int | None) -> None:
    """rc as documented, no traceback, no ERROR line, no telemetry message."""
    where = f"[{command.where}] {command.text}"
    if expected is not None:
        assert rc == expected, f"{where}: exit code {rc}, expected {expected}\n{output[-3000:]}"
    assert "Traceback" not in output, f"{where}: traceback\n{output[-3000:]}"
    errors = [line for line in output.splitlines() if ERROR_LINE.search(line)]
    assert not errors, f"{where}: ERROR line(s)\n" + "\n".join(errors[:5])
    assert not TELEMETRY.search(output), f"{where}: telemetry message\n{output[-3000:]}"


def placeholders(fresh: Fresh) -> dict[str, str]:
    """The README's stand-ins for a user's own files -> files of the demo (whole words only)."""
    product = fresh.products[0]
    test_dir = f"{DEMO_OUT}/data/{product}/test"
    camera = fresh.root / "runs" / "camera"
    if not camera.is_dir():
        camera.mkdir(parents=True)
        for image in sorted((fresh.root / test_dir / "good").glob("*.png"))[:2]:
            shutil.copy2(image, camera / image.name)
    part = sorted((fresh.root / test_dir / "good").glob("*.png"))[0].relative_to(fresh.root)
    return {
        "images/": f"{test_dir}/",
        "'line/*.png'": f"'{test_dir}/good/*.png'",
        "path/to/new_product": fresh.new_product,
        "PRODUCT_DIR": fresh.new_product,
        "--name NAME": f"--name {Path(fresh.new_product).name}",
        "CAMERA_DIR": "runs/camera",
        "@part.png": f"@{part}",
        "127.0.0.1:8000": f"127.0.0.1:{fresh.port}",
    }


def substitute(text: str, table: dict[str, str]) -> str:
    for placeholder, value in table.items():
        text = re.sub(rf"(?<![\w.-]){re.escape(placeholder)}(?![\w-])", value, text)
    return text


def _run(fresh: Fresh, command: Command, text: str, env: dict[str, str]) -> str:
    """Run one command as printed (``make``: without rebuilding ``.venv``); its output, after ``_check``."""
    if text.startswith("make "):
        text = NO_VENV_REBUILD + text.removeprefix("make ")
    done = subprocess.run(["bash", "-ec", text], cwd=fresh.root, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    _check(command, done.returncode, done.stdout + done.stderr, 0)
    return done.stdout


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except OSError as exc:
        return getattr(exc, "code", 0) or 0, str(exc)


@dataclass
class Server:
    """A long-running command: its process and where to probe it."""

    command: Command
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _ready_path(text: str) -> str:
    """The path that answers 200 once the server command ``text`` is up."""
    if "mlflow models serve" in text:
        return "/ping"
    return "/" if "mlflow ui" in text else "/readyz"


@contextmanager
def _start(fresh: Fresh, command: Command, text: str, env: dict[str, str], port: int) -> Iterator[Server]:
    log = fresh.root / "runs" / f"server-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        process = subprocess.Popen(["bash", "-c", text], cwd=fresh.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = Server(command, process, log)
    try:
        path = _ready_path(text)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            assert process.poll() is None, f"[{command.where}] {text}: exited with {process.returncode} while starting\n{server.output()[-3000:]}"
            status, _ = _get(f"http://127.0.0.1:{port}{path}")
            if status == 200:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"[{command.where}] {text}: not up on port {port} after {SERVER_START_S:.0f} s\n{server.output()[-3000:]}")
        yield server
        assert process.poll() is None, f"[{command.where}] {text}: exited with {process.returncode}\n{server.output()[-3000:]}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # what a service manager sends; SIGINT would interrupt workers mid-import (KeyboardInterrupt tracebacks)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    _check(command, None, server.output(), None)


def run_all(fresh: Fresh, commands: list[Command], env: dict[str, str]) -> list[str]:
    """Run ``commands`` in order (servers: start, probe, the following ``curl`` lines against them, stop); returns what ran."""
    table = placeholders(fresh)
    ran: list[str] = []
    i = 0
    while i < len(commands):
        command = commands[i]
        i += 1
        text = substitute(command.text, table)
        if any(text.startswith(skip) for skip in SKIPPED):
            continue
        server = next((s for s in SERVERS if f" {s}" in f" {text}" or f"/{s}" in text), None)
        if server is None:
            _run(fresh, command, text, env)
            ran.append(text)
            continue
        port = fresh.port if server == "serve-api" else _free_port()
        server_env = {**env, "MLFLOW_PORT": str(port)}  # mlflow's own variable for --port: the printed command is unchanged
        with _start(fresh, command, text, server_env, port):
            ran.append(text)
            if server == "serve-api":
                status, page = _get(f"http://127.0.0.1:{port}/docs")
                assert status == 200 and "swagger" in page.lower() and "cdn" not in page.lower(), f"/docs: {status} {page[:500]}"
                while i < len(commands) and commands[i].text.startswith("curl"):
                    curl = substitute(commands[i].text, table)
                    answer = _run(fresh, commands[i], curl, env)
                    assert '"decision"' in answer, f"{curl}: {answer[:500]}"  # curl -s exits 0 on an HTTP error too
                    ran.append(curl)
                    i += 1
    return ran


def test_readme_blocks_are_parsed_and_the_quick_start_is_two_commands() -> None:
    commands = readme_commands(README.read_text())
    quick = [c.text.split("#")[0].strip() for c in commands if c.where == "Quick start"]
    assert quick == ["make demo", "make test"]
    assert any("add-product path/to/new_product --name new_product banks.store_dir=runs/demo/banks" in c.text for c in commands)
    assert all(not c.text.startswith("contad ") for c in commands), "without an activated .venv: .venv/bin/contad"
    sample = "# T\n```bash\na --x \\\n  b  # note\n# only a comment\n```\n```text\nnot a command\n```\n"
    assert readme_commands(sample) == [Command("T", "a --x b  # note")]
    closing = ("finished in 3 s. Where to look:\n  report:        runs/demo/report.md\n"
               "  not promoted:  step 2 (screw): the product's AUROC\n  predict:       .venv/bin/contad predict x --out y\n"
               "  REST service:  .venv/bin/contad serve-api --bank b   (docs: http://127.0.0.1:8000/docs)\n")
    assert closing_commands(closing) == [Command("demo: predict", ".venv/bin/contad predict x --out y"),
                                         Command("demo: REST service", ".venv/bin/contad serve-api --bank b")]


@pytest.mark.slow
@pytest.mark.integration
def test_readme_commands_run_as_printed_after_make_demo(fresh: Fresh, request: pytest.FixtureRequest) -> None:
    env = {**fresh.env, "PREFECT_API_URL": shared_prefect_api(request)}
    ran = run_all(fresh, readme_commands(README.read_text()), env)
    assert any(" serve-api " in c for c in ran) and any(c.startswith("curl") for c in ran)
    assert any(" stream " in c for c in ran) and any(" add-product " in c for c in ran)
    assert (fresh.root / "runs" / "predictions" / "predictions.csv").is_file()


@pytest.mark.slow
@pytest.mark.integration
def test_demo_closing_block_commands_run_as_printed(fresh: Fresh, request: pytest.FixtureRequest) -> None:
    commands = closing_commands(fresh.demo_stdout)
    labels = {c.where for c in commands}
    assert {"demo: predict", "demo: REST service", "demo: MLflow UI", "demo: bank versions", "demo: add a product"} <= labels, labels
    env = {**fresh.env, "PREFECT_API_URL": shared_prefect_api(request)}
    ran = run_all(fresh, [c for c in commands if c.where not in DEMO_SKIPPED], env)
    assert len(ran) == len(commands) - len(DEMO_SKIPPED)
