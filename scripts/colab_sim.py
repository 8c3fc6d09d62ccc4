"""Run the notebooks as a Colab user meets them, without Colab and without a package index.

    python3 scripts/colab_sim.py --out DIR [--gpu t4|l4|none] [--wheels WHEEL_DIR ...] [--timeout 1800] \\
        [--keep-going] notebooks/01_*.ipynb ...

What it simulates, step by step (each timed in DIR/harness.log):

1. **Clone**: the repository's git-tracked files (their working-tree content) are copied to DIR/home,
   standing in for the install cell's ``git clone`` into /content/recipes (``RECIPES_HOME``).
2. **Package index**: DIR/wheelhouse holds one wheel per distribution of the requirement closure of
   ``recipes_lib[notebooks]`` (from pyproject.toml, markers and extras evaluated), of the kernel
   tooling (ipykernel, nbclient, nbformat) and of pip and setuptools (pip's isolated build of the
   package needs setuptools). A wheel found in a ``--wheels`` folder is copied; a distribution
   installed in the interpreter running this script is repacked into a ``py3-none-any`` wheel from
   its installed files. torch and its own requirement closure are left out: step 3 provides them.
3. **A fresh Python holding only torch**, like Colab's preinstalled CUDA torch: a venv whose
   site-packages has a ``.pth`` pointing at DIR/torch_only, a folder of symlinks to this
   interpreter's torch and its requirement closure. pip is bootstrapped from the wheelhouse.
4. **The notebook host's kernel**: ipykernel, nbclient and nbformat installed into the venv from
   the wheelhouse, and a kernel spec ``colab-sim``.
5. **Run**: every notebook given is copied into DIR/home/notebooks and executed there with nbclient
   on that kernel, with ``RECIPES_COLAB=1`` (the install cell then does its Colab work: the first
   notebook's install cell pip-installs ``$RECIPES_HOME[notebooks]`` from the wheelhouse through
   ``PIP_NO_INDEX``/``PIP_FIND_LINKS``; later notebooks find it installed) and
   ``RECIPES_SIMULATE_GPU`` set to the ``--gpu`` class, which caps the GPU's memory and disables bf16.
   DIR/executed/<name>.ipynb is written after every cell, so a failure leaves what ran. A notebook
   stops at its first failing cell, unless ``--keep-going``: then every cell runs and each failing
   one is listed (later ones may only follow from the first), so one GPU run finds them all.
6. **Report**: DIR/summary.json (per notebook: passed, wall seconds, the failing cell's index among
   all the notebook's cells and the error's last lines, the install cell's own seconds; the machine,
   the GPU class simulated, the venv's packages), DIR/pip_list.txt, and a table on stdout.
   DIR/logs/ holds each notebook's runner output.
   The exit code is 1 if any notebook failed, 2 if a setup step failed.

What it does not simulate: Colab's other preinstalled packages (transformers, pandas, matplotlib ...
are installed here by the notebook's install cell, on Colab most are already there, in Colab's
versions); data files that wheels install outside site-packages (repacked wheels keep only the
files under site-packages); Colab's network (the clone is a copy, the index a folder); and a real
T4's or L4's kernels, features beyond bf16 and speed: a capped H100 runs H100 kernels, fast.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import tomllib  # stdlib from Python 3.11 (ruff files it here: the package supports 3.10)
from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
PROJECT_EXTRA = "notebooks"                      # what each notebook's install cell installs
KERNEL_TOOLS = ["ipykernel", "nbclient", "nbformat"]  # what a notebook host provides
BUILD_TOOLS = ["pip", "setuptools"]              # pip bootstraps the venv; setuptools builds recipes_lib
KERNEL_NAME = "colab-sim"
# Not copied when the checkout has no .git (the same things .gitignore leaves out).
UNTRACKED = {".git", ".venv", "outputs", ".whl", ".scratch", "__pycache__", ".pytest_cache",
             ".ipynb_checkpoints"}
# Written by the installer, not part of a wheel; RECORD and WHEEL are written afresh.
INSTALLER_FILES = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD", "WHEEL"}
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Step 5 runs this with the venv's python: nbclient lives there, not in the running interpreter.
RUNNER = r'''"""Execute one notebook with nbclient (written by scripts/colab_sim.py, its step 5)."""
import json
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

src, dst, result_path, timeout, kernel, keep_going = sys.argv[1:7]
keep_going = keep_going == "1"  # run every cell, errors or not, and list the failing ones
nb = nbformat.read(src, as_version=4)
cells, current = [], {}


def started(cell, cell_index, **_):
    current.update(index=cell_index, start=time.monotonic())


def executed(cell, cell_index, **_):
    cells.append({"index": cell_index, "seconds": round(time.monotonic() - current["start"], 2)})
    nbformat.write(nb, dst)  # a failure or a kill half-way still leaves what ran


client = NotebookClient(nb, timeout=int(timeout), kernel_name=kernel, allow_errors=keep_going,
                        resources={"metadata": {"path": os.path.dirname(os.path.abspath(src))}},
                        on_cell_start=started, on_cell_executed=executed)
result = {"passed": False, "failed_cell": None, "error": None, "cells": cells, "errors": []}
try:
    client.execute()
    result["errors"] = [{"index": i, "error": f"{o['ename']}: {o['evalue']}"} for i, c in enumerate(nb.cells)
                        if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    result["passed"] = not result["errors"]
    if result["errors"]:
        result["failed_cell"], result["error"] = result["errors"][0]["index"], result["errors"][0]["error"]
except Exception as error:  # CellExecutionError, CellTimeoutError, DeadKernelError ...
    result["failed_cell"] = current.get("index")
    result["error"] = f"{type(error).__name__}: {error}"
finally:
    nbformat.write(nb, dst)
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
sys.exit(0 if result["passed"] else 1)
'''


class SetupError(RuntimeError):
    """A step before the notebooks run failed."""


# ----------------------------------------------------------------------------- requirement closure

@dataclass
class Candidate:
    """One distribution that satisfies a requirement: a wheel file, an installed one, or the project."""

    name: str                      # canonical
    version: str
    requires: list[str]            # Requires-Dist lines, markers included
    wheel: Path | None = None      # from a --wheels folder: copied
    dist: md.Distribution | None = field(default=None, repr=False)  # installed here: repacked

    @property
    def source(self) -> str:
        return f"wheel {self.wheel.name}" if self.wheel else "installed" if self.dist else "project"


Finder = Callable[[Requirement], "Candidate | str"]  # a candidate, or why there is none


def resolve(roots: Iterable[str], find: Finder,
            provided: dict[str, Candidate] | None = None) -> tuple[dict[str, Candidate], list[str]]:
    """The requirement closure of ``roots``: one candidate per distribution, and the problems met.

    A requirement's marker is evaluated against this interpreter with ``extra`` set to each extra
    its parent was asked for. ``provided`` (torch's closure) answers for its names instead of
    ``find``; they are in the result too, but the extras asked of them still bring in their own
    requirements (``fsspec[http]`` needs aiohttp, which torch does not).
    """
    provided = provided or {}
    chosen: dict[str, Candidate] = {}
    expanded: dict[str, set[str]] = {}  # the extras whose requirements are queued already
    problems: list[str] = []
    missing: set[str] = set()
    queue = deque((Requirement(r), frozenset({""})) for r in roots)
    while queue:
        req, extras = queue.popleft()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        name = canonicalize_name(req.name)
        if name in missing:
            continue
        cand = chosen.get(name)
        if cand is None:
            found = provided.get(name) or find(req)
            if isinstance(found, str):
                problems.append(f"{req}: {found}")
                missing.add(name)
                continue
            cand = chosen[name] = found
            expanded[name] = set()
        if not req.specifier.contains(cand.version, prereleases=True):
            problems.append(f"{req}: but {cand.name} {cand.version} ({cand.source}) is chosen")
            continue
        new = ({""} | {canonicalize_name(e) for e in req.extras}) - expanded[name]
        expanded[name] |= new
        for line in cand.requires if new else []:
            try:
                queue.append((Requirement(line), frozenset(new)))
            except InvalidRequirement as error:
                problems.append(f"{cand.name}: unparsable requirement {line!r} ({error})")
    return chosen, problems


def project_candidate(root: Path) -> Candidate:
    """The project itself, from its pyproject.toml: extras become ``extra == "..."`` markers."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    requires = list(project.get("dependencies", []))
    for extra, lines in project.get("optional-dependencies", {}).items():
        for line in lines:
            req = Requirement(line)
            marker = f"({req.marker}) and " if req.marker else ""
            req.marker = None
            requires.append(f'{req}; {marker}extra == "{canonicalize_name(extra)}"')
    return Candidate(canonicalize_name(project["name"]), project.get("version", "0"), requires)


def wheel_requires(path: Path) -> list[str]:
    """Requires-Dist of a wheel file (its .dist-info/METADATA)."""
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if len(names) != 1:
            raise SetupError(f"{path.name}: {len(names)} .dist-info/METADATA files, expected one")
        meta = email.parser.BytesParser().parsebytes(zf.read(names[0]), headersonly=True)
    return meta.get_all("Requires-Dist") or []


def index_wheels(folders: Iterable[Path]) -> dict[str, list[tuple[Version, Path]]]:
    """The wheels in ``folders`` this interpreter can install, by canonical name."""
    tags = set(sys_tags())
    wheels: dict[str, list[tuple[Version, Path]]] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("*.whl")):
            try:
                name, version, _, wheel_tags = parse_wheel_filename(path.name)
            except (ValueError, InvalidVersion):
                continue
            if wheel_tags & tags:
                wheels.setdefault(name, []).append((version, path))
    return wheels


def make_finder(wheel_dirs: Iterable[Path] = (), project: Candidate | None = None,
                installed: bool = True) -> Finder:
    """Find a requirement's candidate: the project, else the newest fitting wheel, else installed."""
    wheels = index_wheels(wheel_dirs)

    def find(req: Requirement) -> Candidate | str:
        name = canonicalize_name(req.name)
        if project is not None and name == project.name:
            return project
        fitting = [(v, p) for v, p in wheels.get(name, []) if req.specifier.contains(v, prereleases=True)]
        if fitting:
            version, path = max(fitting)
            return Candidate(name, str(version), wheel_requires(path), wheel=path)
        why = [f"wheels {', '.join(str(v) for v, _ in wheels[name])} do not fit"] if name in wheels else []
        if installed:
            try:
                dist = md.distribution(req.name)
            except md.PackageNotFoundError:
                why.append("not installed here")
            else:
                if req.specifier.contains(dist.version, prereleases=True):
                    return Candidate(name, dist.version, dist.requires or [], dist=dist)
                why.append(f"installed {dist.version} does not fit")
        return "; ".join(why or ["no wheel in --wheels"])

    return find


# ----------------------------------------------------------------------------- installed files

def site_files(dist: md.Distribution) -> tuple[Path, list[str]]:
    """The folder a distribution is installed in, and its RECORD's files under it (no .pyc)."""
    if dist.files is None:
        raise SetupError(f"{dist.metadata['Name']}: no RECORD, so its files are unknown")
    site = Path(dist.locate_file(""))
    files = []
    for f in dist.files:
        rel = os.path.relpath(os.path.normpath(site / f), site)
        parts = Path(rel).parts
        if parts[0] == ".." or "__pycache__" in parts:
            continue  # scripts, data files outside site-packages; compiled bytecode
        files.append(Path(rel).as_posix())
    return site, files


def _record_hash(digest: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def repack(dist: md.Distribution, out_dir: Path) -> Path:
    """A ``py3-none-any`` wheel of an installed distribution, from its files under site-packages.

    It holds what RECORD lists there (the .dist-info included, less what an installer writes),
    a WHEEL file and a fresh RECORD; file modes are kept, so executables stay executable.
    """
    direct_url = dist.read_text("direct_url.json")
    if direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"):
        raise SetupError(f"{dist.metadata['Name']} is an editable install: pass a wheel of it with --wheels")
    site, files = site_files(dist)
    meta = [f for f in files if re.fullmatch(r"[^/]+\.dist-info/METADATA", f)]
    if len(meta) != 1:
        raise SetupError(f"{dist.metadata['Name']}: found {len(meta)} .dist-info/METADATA in its RECORD")
    dist_info = meta[0].split("/")[0]
    name = canonicalize_name(dist.metadata["Name"]).replace("-", "_")
    path = out_dir / f"{name}-{dist.version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, strict_timestamps=False) as zf:
        for rel in files:
            parts = rel.split("/")
            src = site / rel
            installer_file = parts[0] == dist_info and len(parts) == 2 and parts[1] in INSTALLER_FILES
            if installer_file or not src.is_file():
                continue
            info = zipfile.ZipInfo.from_file(src, rel, strict_timestamps=False)
            info.compress_type = zipfile.ZIP_STORED
            digest, size = hashlib.sha256(), 0
            with open(src, "rb") as fin, zf.open(info, "w", force_zip64=True) as fout:
                while chunk := fin.read(1 << 20):
                    digest.update(chunk)
                    fout.write(chunk)
                    size += len(chunk)
            record.append(f"{rel},{_record_hash(digest.digest())},{size}")
        wheel = (b"Wheel-Version: 1.0\nGenerator: colab_sim (repacked from an installed distribution)\n"
                 b"Root-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist_info}/WHEEL", wheel)
        record.append(f"{dist_info}/WHEEL,{_record_hash(hashlib.sha256(wheel).digest())},{len(wheel)}")
        record.append(f"{dist_info}/RECORD,,")
        zf.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return path


def link_distributions(dists: Iterable[md.Distribution], target: Path) -> list[str]:
    """Symlink the top-level entries (packages, modules, .dist-info) of ``dists`` into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    linked = set()
    for dist in dists:
        site, files = site_files(dist)
        for top in {f.split("/")[0] for f in files}:
            if top not in linked and (site / top).exists():
                (target / top).symlink_to(site / top)
                linked.add(top)
    return sorted(linked)


# ----------------------------------------------------------------------------- harness

class Harness:
    def __init__(self, out: Path, gpu: str, timeout: int, keep_going: bool = False):
        self.out, self.gpu, self.timeout, self.keep_going = out, gpu, timeout, keep_going
        self.home, self.wheelhouse = out / "home", out / "wheelhouse"
        self.venv, self.torch_only = out / "venv", out / "torch_only"
        self.python = self.venv / "bin" / "python"
        self.steps: dict[str, float] = {}
        self.machine: dict = {"python": sys.version.split()[0], "interpreter": sys.executable}
        self.start = time.monotonic()
        self._log = open(out / "harness.log", "w")

    def log(self, text: str) -> None:
        for line in str(text).rstrip("\n").splitlines() or [""]:
            line = f"[{time.monotonic() - self.start:7.1f}s] {line}"
            print(line, flush=True)
            self._log.write(line + "\n")
        self._log.flush()

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.log(f"== {title}")
        start = time.monotonic()
        try:
            yield
        finally:
            self.steps[title] = round(time.monotonic() - start, 1)
            self.log(f"== {title}: {self.steps[title]} s")

    def env(self) -> dict[str, str]:
        """A Colab user's environment: nothing of this interpreter's venv, pip offline on the wheelhouse."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV", "CONDA", "JUPYTER", "RECIPES_"))}
        here = str(Path(sys.prefix) / "bin") if sys.prefix != sys.base_prefix else None
        path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != here]
        env.update(PATH=os.pathsep.join([str(self.venv / "bin"), *path]), VIRTUAL_ENV=str(self.venv),
                   RECIPES_COLAB="1", RECIPES_HOME=str(self.home), RECIPES_PROGRESS="0",
                   PIP_NO_INDEX="1", PIP_FIND_LINKS=str(self.wheelhouse), PIP_DISABLE_PIP_VERSION_CHECK="1",
                   PIP_CACHE_DIR=str(self.out / "pip-cache"), PYTHONUNBUFFERED="1")
        if self.gpu != "none":
            env["RECIPES_SIMULATE_GPU"] = self.gpu
        return env

    def sh(self, cmd: list, check: bool = True, quiet: bool = False, cwd: Path | None = None
           ) -> subprocess.CompletedProcess:
        """Run ``cmd`` in the simulated environment (in DIR, not the checkout), its output into the log."""
        self.log("$ " + " ".join(str(c) for c in cmd))
        proc = subprocess.run([str(c) for c in cmd], env=self.env(), capture_output=True, text=True,
                              cwd=cwd or self.out)
        out = (proc.stdout + proc.stderr).strip()
        if out and not quiet:
            self.log(out if len(out) < 4000 else "...\n" + out[-4000:])
        if check and proc.returncode:
            raise SetupError(f"{cmd[0]} {cmd[1] if len(cmd) > 1 else ''}... exited {proc.returncode}")
        return proc

    # 1
    def clone(self) -> None:
        if (ROOT / ".git").exists():
            # tracked files and untracked ones .gitignore lets through: a copy of a working tree (the GPU
            # machine's) can carry a stale index that misses files added since
            ls = ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
            listed = subprocess.run(ls, check=True, capture_output=True).stdout.decode().split("\0")
            copied = 0
            for rel in filter(None, listed):
                src, dst = ROOT / rel, self.home / rel
                if src.is_file() or src.is_symlink():  # a tracked file deleted in the checkout is skipped
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst, follow_symlinks=False)
                    copied += 1
            self.log(f"copied {copied} git-tracked files of {ROOT} (working-tree content) to {self.home}")
        else:
            out = self.out.resolve()

            def ignore(folder: str, names: list[str]) -> set[str]:
                return {n for n in names if n in UNTRACKED or n.endswith((".whl", ".egg-info"))
                        or Path(folder, n).resolve() == out}

            shutil.copytree(ROOT, self.home, symlinks=True, ignore=ignore)
            self.log(f"no .git: copied {ROOT} less {sorted(UNTRACKED)} to {self.home}")

    # 2
    def build_wheelhouse(self, wheel_dirs: list[Path]) -> dict[str, Candidate]:
        """Fill the wheelhouse; return torch's closure (step 3 links it)."""
        installed = make_finder()
        torch_closure, problems = resolve(["torch"], installed)
        if problems:
            raise SetupError("torch's closure is not installed here:\n  " + "\n  ".join(problems))
        self.log(f"torch's closure (from this interpreter, not packed): {', '.join(sorted(torch_closure))}")
        project = project_candidate(self.home)
        find = make_finder(wheel_dirs, project)
        chosen, problems = resolve([f"{project.name}[{PROJECT_EXTRA}]", *KERNEL_TOOLS], find, torch_closure)
        tools, tool_problems = resolve(BUILD_TOOLS, find)
        if problems or tool_problems:
            raise SetupError("no wheel for:\n  " + "\n  ".join(problems + tool_problems)
                             + "\n(put wheels of these in a folder and pass it with --wheels)")
        packed = {n: c for n, c in chosen.items() if n not in torch_closure and c.source != "project"}
        packed.update(tools)
        self.wheelhouse.mkdir()
        for name in sorted(packed):
            cand = packed[name]
            if cand.wheel:
                shutil.copy2(cand.wheel, self.wheelhouse / cand.wheel.name)
            else:
                repack(cand.dist, self.wheelhouse)
            self.log(f"  {name} {cand.version}: {cand.source}")
        size = sum(p.stat().st_size for p in self.wheelhouse.iterdir()) / 2**20
        self.log(f"wheelhouse: {len(packed)} wheels, {size:.0f} MiB")
        self.pip_wheel = next(self.wheelhouse.glob("pip-*.whl"))
        return torch_closure

    # 3
    def make_venv(self, torch_closure: dict[str, Candidate]) -> None:
        self.sh([sys.executable, "-m", "venv", "--without-pip", self.venv])
        linked = link_distributions((c.dist for c in torch_closure.values()), self.torch_only)
        self.log(f"{self.torch_only}: {len(linked)} links")
        site = self.sh([self.python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
        (Path(site.stdout.strip()) / "colab_sim_torch.pth").write_text(f"{self.torch_only}\n")
        self.sh([self.python, self.pip_wheel / "pip", "install", "-q", "--no-index", self.pip_wheel])
        probe = ("import json, sys, torch; cuda = torch.cuda.is_available(); print(json.dumps(dict("
                 "torch=torch.__version__, torch_file=torch.__file__, cuda=cuda,"
                 " python=sys.version.split()[0], device=torch.cuda.get_device_name(0) if cuda else 'cpu')))")
        proc = self.sh([self.python, "-c", probe])
        self.machine.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        proc = self.sh([self.python, "-c", "import transformers"], check=False)
        if proc.returncode == 0:
            raise SetupError("transformers imports in the fresh venv: it is not isolated")
        self.log("import transformers fails in the venv, as it should (only torch is preinstalled)")

    # 4
    def install_kernel(self) -> None:
        self.sh([self.python, "-m", "pip", "install", "-q", "--no-index", "--find-links", self.wheelhouse,
                 *KERNEL_TOOLS])
        self.sh([self.python, "-m", "ipykernel", "install", "--sys-prefix", "--name", KERNEL_NAME,
                 "--display-name", "Python 3 (colab-sim)"])

    # 5
    def run_notebook(self, notebook: Path) -> dict:
        runner = self.out / "run_notebook.py"
        runner.write_text(RUNNER)
        src = self.home / "notebooks" / notebook.name
        if notebook.resolve() != src.resolve():
            shutil.copy2(notebook, src)
        (self.out / "executed").mkdir(exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        dst, result_path = self.out / "executed" / notebook.name, self.out / "logs" / f"{notebook.stem}.json"
        find = "import importlib.util as u; s = u.find_spec('recipes_lib'); print(s and s.origin)"
        before = self.sh([self.python, "-c", find], cwd=src.parent)  # where the kernel starts
        preinstalled = before.stdout.strip() != "None"
        start = time.monotonic()
        with open(self.out / "logs" / f"{notebook.stem}.log", "w") as log:
            proc = subprocess.run([str(self.python), str(runner), str(src), str(dst), str(result_path),
                                   str(self.timeout), KERNEL_NAME, "1" if self.keep_going else "0"],
                                  env=self.env(), cwd=src.parent,
                                  stdout=log, stderr=subprocess.STDOUT)
        wall = round(time.monotonic() - start, 1)
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError):
            result = {"passed": False, "failed_cell": None, "cells": [],
                      "error": f"the runner exited {proc.returncode} without a result: "
                               f"see logs/{notebook.stem}.log"}
        entry = {"notebook": notebook.name, "passed": bool(result["passed"]) and proc.returncode == 0,
                 "wall_s": wall, "executed": str(dst), "package_preinstalled": preinstalled}
        nb = json.loads(src.read_text())
        install = next((i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
                        and "pip" in "".join(c["source"]) and "install" in "".join(c["source"])), None)
        seconds = {c["index"]: c["seconds"] for c in result["cells"]}
        entry["install_cell"] = install
        entry["install_cell_s"] = seconds.get(install)
        what = "recipes_lib was installed already" if preinstalled else "pip install ran"
        self.log(f"install cell (cell {install}): {entry['install_cell_s']} s, {what}")
        if not entry["passed"]:
            cell = result["failed_cell"]
            lines = ANSI.sub("", result.get("error") or "").rstrip().splitlines()
            entry.update(failed_cell=cell, error="\n".join(lines[-15:]))
            if cell is not None:
                entry["failed_cell_source"] = "".join(nb["cells"][cell]["source"]).splitlines()[:3]
            self.log(f"FAILED at cell {cell}:\n{entry['error']}")
            if len(result.get("errors", [])) > 1:  # --keep-going: every failing cell, not only the first
                entry["errors"] = result["errors"]
                self.log("failing cells (--keep-going): " + "; ".join(
                    f"{e['index']}: {e['error'][:200]}" for e in result["errors"]))
        self.log(f"{notebook.name}: {'passed' if entry['passed'] else 'FAILED'} in {wall} s")
        self.sh([self.python, "-c", find], cwd=src.parent)
        return entry

    # 6
    def report(self, results: list[dict], setup_error: str | None) -> None:
        installed = {}
        if self.python.exists() and (self.venv / "bin" / "pip").exists():
            listing = self.sh([self.python, "-m", "pip", "list"], check=False, quiet=True)
            (self.out / "pip_list.txt").write_text(listing.stdout)
            as_json = self.sh([self.python, "-m", "pip", "list", "--format=json"], check=False, quiet=True)
            try:
                installed = {p["name"]: p["version"] for p in json.loads(as_json.stdout)}
            except ValueError:
                pass
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True)
            self.machine["nvidia_smi"] = smi.stdout.strip().splitlines() or None
        summary = {"machine": self.machine, "gpu_simulated": None if self.gpu == "none" else self.gpu,
                   "steps_s": self.steps, "setup_error": setup_error, "notebooks": results,
                   "installed": installed}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        self.log(f"summary: {self.out / 'summary.json'}")
        self.log(f"{'notebook':<42} {'result':<7} {'wall s':>7} {'install cell s':>15}  failed cell")
        for r in results:
            self.log(f"{r['notebook']:<42} {'passed' if r['passed'] else 'FAILED':<7} {r['wall_s']:>7} "
                     f"{r['install_cell_s'] if r['install_cell_s'] is not None else '-':>15}  "
                     f"{r.get('failed_cell', '') if not r['passed'] else ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True,
                        help="working folder (its earlier results are replaced)")
    parser.add_argument("--gpu", choices=["t4", "l4", "none"], default="t4",
                        help="RECIPES_SIMULATE_GPU for the notebooks (default t4, Colab's free GPU)")
    parser.add_argument("--wheels", type=Path, action="append", default=[], metavar="WHEEL_DIR",
                        help="a folder of wheels for what this interpreter lacks (they win over installed);"
                             " repeat for several")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    parser.add_argument("--keep-going", action="store_true",
                        help="run every cell even after one fails, and list all failing cells (later "
                             "failures may follow from the first); a notebook passes only with none")
    args = parser.parse_args(argv)
    for nb in args.notebooks:
        if not nb.is_file():
            parser.error(f"no notebook {nb}")
    for folder in args.wheels:
        if not folder.is_dir():
            parser.error(f"--wheels {folder}: not a folder")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ["home", "wheelhouse", "venv", "torch_only", "executed", "logs", "pip-cache"]:
        shutil.rmtree(out / name, ignore_errors=True)
    harness = Harness(out, args.gpu, args.timeout, args.keep_going)
    harness.log(f"colab_sim: {sys.executable} (Python {sys.version.split()[0]}), out {out}, gpu {args.gpu}")
    results, setup_error = [], None
    try:
        with harness.step("1 clone"):
            harness.clone()
        with harness.step("2 wheelhouse"):
            torch_closure = harness.build_wheelhouse(args.wheels)
        with harness.step("3 venv with torch only"):
            harness.make_venv(torch_closure)
        with harness.step("4 kernel"):
            harness.install_kernel()
        for nb in args.notebooks:
            with harness.step(f"5 run {nb.name}"):
                results.append(harness.run_notebook(nb))
    except (SetupError, subprocess.CalledProcessError, OSError) as error:
        setup_error = f"{type(error).__name__}: {error}"
        harness.log(f"SETUP FAILED: {setup_error}")
    with harness.step("6 report"):
        harness.report(results, setup_error)
    if setup_error:
        return 2
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
